"""Reading a non-final stage's hidden states out of llama_decode: one graph node's output, copied by a C callback.

A non-final stage hands on the residual stream after its last layer, the graph node ``l_out-{n_layer-1}``.
llama.cpp's eval callback (``cb_eval``) sees every node of the graph; the one in ``_capture.c`` copies that
node's rows into a buffer owned here and stops the graph there (the final norm and the head are never computed).
It is C because ggml asks the callback about every node: in Python each of those calls took the GIL.
"""

from __future__ import annotations

import ctypes

import llama_cpp as llama
import numpy as np

from chatloop.engine import _capture
from chatloop.engine.native import ggml_base


class _State(ctypes.Structure):
    # NOTE: field for field ``struct capture_state`` in _capture.c.
    _fields_ = [
        ("get_name", ctypes.c_void_p),
        ("nbytes", ctypes.c_void_p),
        ("tensor_get", ctypes.c_void_p),
        ("target", ctypes.c_char * 64),
        ("buffer", ctypes.c_void_p),
        ("capacity", ctypes.c_size_t),
        ("used", ctypes.c_size_t),
        ("overflow", ctypes.c_int),
    ]


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


class HiddenCapture:
    """The rows of one graph node, captured during each ``llama_decode`` of a context built with ``install``."""

    def __init__(self, node_name: str, max_rows: int, n_embd: int) -> None:
        target = node_name.encode()
        if len(target) >= 64:
            raise ValueError(f"graph node name too long for the capture callback: {node_name!r}")
        self.n_embd = n_embd
        self._buffer = np.empty((max_rows, n_embd), dtype=np.float32)
        self._state = _State(
            get_name=_address(ggml_base.ggml_get_name),
            nbytes=_address(ggml_base.ggml_nbytes),
            tensor_get=_address(ggml_base.ggml_backend_tensor_get),
            target=target,
            buffer=self._buffer.ctypes.data,
            capacity=self._buffer.nbytes,
        )
        # NOTE: both must live as long as any context they were installed in.
        self._callback = llama.ggml_backend_sched_eval_callback(_capture.callback_address)

    def install(self, params: llama.llama_context_params) -> None:
        """Make contexts created with ``params`` call the capture on every decode."""
        params.cb_eval = self._callback
        params.cb_eval_user_data = ctypes.addressof(self._state)

    def reset(self) -> None:
        """Forget what the last decode captured (call before each decode)."""
        self._state.used = 0
        self._state.overflow = 0

    def rows(self) -> np.ndarray:
        """The rows captured since ``reset``, ``[n_rows, n_embd]`` in the order llama.cpp computed them: a view of
        the buffer, valid until the next decode (copy what must outlive it)."""
        if self._state.overflow:
            raise RuntimeError(f"the decode produced more than {self._buffer.shape[0]} hidden rows")
        n_rows = self._state.used // (4 * self.n_embd)
        return self._buffer[:n_rows]
