"""Owning wrappers for llama.cpp's C handles: model, context, batch and sampler.

Each wrapper frees its handle exactly once (``close()`` is safe to call twice) and works as a context
manager. A context registers its own ``close`` with its model, so closing a model always frees its
contexts first (the order llama.cpp requires), the pattern of llama-cpp-python's ``_internals.py``.
"""

from __future__ import annotations

import ctypes
import logging
import pathlib
from collections.abc import Callable
from contextlib import ExitStack

import llama_cpp as llama
import numpy as np

from chatloop.engine.native import ensure_backend

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """llama.cpp refused a model file."""


class _Owned:
    """Base: an ExitStack that runs each registered free exactly once."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down ctypes already
            pass


class Model(_Owned):
    """A loaded GGUF model (weights memory-mapped), or only its vocabulary with ``vocab_only``."""

    def __init__(self, path: str | pathlib.Path, *, vocab_only: bool = False, use_mmap: bool = True) -> None:
        super().__init__()
        ensure_backend()
        self.path = pathlib.Path(path)
        params = llama.llama_model_default_params()
        params.vocab_only = vocab_only
        params.n_gpu_layers = 0
        params.load_mode = llama.LLAMA_LOAD_MODE_MMAP if use_mmap else llama.LLAMA_LOAD_MODE_NONE
        handle = llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            raise ModelLoadError(f"llama.cpp could not load model file {self.path}")
        self.handle = handle
        self._stack.callback(llama.llama_model_free, handle)
        self.vocab = llama.llama_model_get_vocab(handle)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` before the model is freed (contexts register themselves here)."""
        self._stack.callback(fn)

    @property
    def n_embd(self) -> int:
        return llama.llama_model_n_embd(self.handle)

    @property
    def n_layer(self) -> int:
        return llama.llama_model_n_layer(self.handle)

    @property
    def n_ctx_train(self) -> int:
        return llama.llama_model_n_ctx_train(self.handle)

    @property
    def n_vocab(self) -> int:
        return llama.llama_vocab_n_tokens(self.vocab)

    @property
    def size_bytes(self) -> int:
        return llama.llama_model_size(self.handle)

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        raw = llama.llama_model_chat_template(self.handle, None)
        return raw.decode("utf-8", "replace") if raw else None


class Context(_Owned):
    """A llama.cpp context over a model: its KV cache and compute graph state. Not thread-safe."""

    def __init__(self, model: Model, params: llama.llama_context_params) -> None:
        super().__init__()
        handle = llama.llama_init_from_model(model.handle, params)
        if not handle:
            raise ModelLoadError(f"llama.cpp could not create a context for {model.path} (n_ctx={params.n_ctx})")
        self.handle = handle
        self.model = model
        self._stack.callback(llama.llama_free, handle)
        model.on_close(self.close)
        self.memory = llama.llama_get_memory(handle)

    @property
    def n_ctx(self) -> int:
        return llama.llama_n_ctx(self.handle)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> None:
        llama.llama_memory_seq_rm(self.memory, seq_id, p0, p1)

    def seq_copy_all(self, src: int, dst: int) -> None:
        """Make ``dst`` a copy of every cell of ``src`` (``dst`` loses what it held).

        NOTE: with one KV stream per sequence (``kv_unified`` False) llama.cpp copies across streams only whole
        buffers: ``llama_memory_seq_cp`` asserts unless p0/p1 cover everything (-1, -1). The cell metadata is
        copied at once, the buffer data at the start of the next ``llama_decode`` (llama_kv_cache::update), so
        nothing may change ``src`` before that decode runs. Trim ``dst`` with ``seq_rm`` afterwards."""
        llama.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def seq_pos_max(self, seq_id: int) -> int:
        return llama.llama_memory_seq_pos_max(self.memory, seq_id)

    def clear(self) -> None:
        llama.llama_memory_clear(self.memory, True)

    def decode(self, batch: Batch) -> None:
        rc = llama.llama_decode(self.handle, batch.handle)
        if rc != 0:
            reasons = {1: "no KV cache slot for the batch", 2: "aborted", -1: "invalid batch"}
            raise RuntimeError(f"llama_decode failed with {rc}: {reasons.get(rc, 'internal error')}")

    def logits_row(self, i: int, n_vocab: int) -> np.ndarray:
        """The logits of output row ``i`` of the last decode, copied out."""
        ptr = llama.llama_get_logits_ith(self.handle, i)
        if not ptr:
            raise RuntimeError(f"no logits for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


class Batch(_Owned):
    """A ``llama_batch`` of up to ``capacity`` tokens, or of hidden-state rows when ``n_embd`` > 0."""

    def __init__(self, capacity: int, n_embd: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self.n_embd = n_embd
        self.handle = llama.llama_batch_init(capacity, n_embd, 1)
        self._stack.callback(llama.llama_batch_free, self.handle)
        self.n_tokens = 0
        # NOTE: llama_batch_init gives every row its own one-element seq_id array. Point the rows into one
        # contiguous array instead, so that fill() sets every row's sequence with one copy rather than a
        # Python loop; the original pointers go back before llama_batch_free frees them (LIFO order).
        self._seq_ids = np.zeros(capacity, dtype=np.int32)
        # NOTE: keep the addresses as ints: ``seq_id[i]`` is a ctypes view of the slot, which would see the change.
        originals = [ctypes.cast(self.handle.seq_id[i], ctypes.c_void_p).value for i in range(capacity)]
        base = self._seq_ids.ctypes.data
        step = self._seq_ids.itemsize
        for i in range(capacity):
            self.handle.seq_id[i] = ctypes.cast(base + step * i, ctypes.POINTER(llama.llama_seq_id))
        self._stack.callback(self._restore_seq_id_pointers, originals)
        # NOTE: numpy views of the batch's own C arrays (freed with it: used only while the batch is open), so
        # that fill() is a few slice assignments; every row belongs to one sequence, set once here.
        self._pos = np.ctypeslib.as_array(self.handle.pos, shape=(capacity,))
        self._out = np.ctypeslib.as_array(self.handle.logits, shape=(capacity,))
        np.ctypeslib.as_array(self.handle.n_seq_id, shape=(capacity,))[:] = 1
        if n_embd:
            self._embd = np.ctypeslib.as_array(self.handle.embd, shape=(capacity, n_embd))
        else:
            self._token = np.ctypeslib.as_array(self.handle.token, shape=(capacity,))

    def _restore_seq_id_pointers(self, originals: list[int]) -> None:
        for i, addr in enumerate(originals):
            self.handle.seq_id[i] = ctypes.cast(addr, ctypes.POINTER(llama.llama_seq_id))

    def fill(
        self,
        positions: np.ndarray,
        seq_ids: np.ndarray,
        output: np.ndarray,
        tokens: np.ndarray | None = None,
        embd: np.ndarray | None = None,
    ) -> None:
        """Set every row at once: ``positions``/``seq_ids``/``output`` are per-row arrays."""
        n = len(positions)
        if n > self.capacity:
            raise ValueError(f"batch of {n} rows exceeds capacity {self.capacity}")
        self.handle.n_tokens = n
        self.n_tokens = n
        self._pos[:n] = positions
        self._out[:n] = output
        self._seq_ids[:n] = seq_ids  # every row's seq_id pointer points into this array (see __init__)
        if self.n_embd:
            if embd is None or embd.shape != (n, self.n_embd):
                raise ValueError(f"hidden rows must have shape ({n}, {self.n_embd})")
            self._embd[:n] = embd
        else:
            if tokens is None or len(tokens) != n:
                raise ValueError(f"need {n} token ids")
            self._token[:n] = tokens


class Sampler(_Owned):
    """A llama.cpp sampler chain (built by ``chatloop.engine.sampling``)."""

    def __init__(self) -> None:
        super().__init__()
        params = llama.llama_sampler_chain_default_params()
        params.no_perf = True
        self.handle = llama.llama_sampler_chain_init(params)
        self._stack.callback(llama.llama_sampler_free, self.handle)
        self.has_grammar = False  # its first sampler is a grammar (chatloop.engine.grammar.add_grammar)

    def add(self, stage) -> None:
        """Append a sampler; the chain takes ownership of it."""
        if not stage:
            raise RuntimeError("llama.cpp returned no sampler")
        llama.llama_sampler_chain_add(self.handle, stage)

    def sample(self, ctx: Context, row: int) -> int:
        """Sample from output row ``row`` of the last decode; the chain also accepts the token."""
        return llama.llama_sampler_sample(self.handle, ctx.handle, row)

    def accept(self, token: int) -> None:
        llama.llama_sampler_accept(self.handle, token)
