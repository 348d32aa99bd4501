"""Cut one GGUF into a stage file with llama.cpp's own quantizer (docs/design.md, mechanism 1).

``llama_model_quantize`` with ``prune_layers`` drops every layer outside the stage's range, renumbers the
kept ones from 0 and rewrites ``<arch>.block_count``; with an ``ftype`` it quantizes while it slices.
A stage that holds neither end of the model is then rewritten without a vocabulary (docs/design.md, mechanism 5).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pathlib

import gguf
import llama_cpp as llama
import numpy as np

from chatloop.engine.native import ensure_backend
from chatloop.modelfiles.quant import QUANT_NAMES

log = logging.getLogger(__name__)

# --quant name -> llama_ftype; "keep" copies tensors untouched.
QUANT_FTYPES: dict[str, int | None] = {
    "keep": None,
    "f32": llama.LLAMA_FTYPE_ALL_F32,
    "f16": llama.LLAMA_FTYPE_MOSTLY_F16,
    "bf16": llama.LLAMA_FTYPE_MOSTLY_BF16,
    "q8_0": llama.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_k_m": llama.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}
assert tuple(QUANT_FTYPES) == QUANT_NAMES, "chatloop/modelfiles/quant.py and this table must name the same types"

# Stage facts written into every stage file, so a stage file describes itself without the manifest.
STAGE_KEYS = ("chatloop.stage_index", "chatloop.stage_count", "chatloop.layer_start", "chatloop.layer_end")


class SliceError(RuntimeError):
    pass


def _int_overrides(values: dict[str, int]) -> ctypes.Array:
    arr = (llama.llama_model_kv_override * (len(values) + 1))()
    for i, (key, value) in enumerate(values.items()):
        arr[i].tag = llama.LLAMA_KV_OVERRIDE_TYPE_INT
        arr[i].key = key.encode()
        arr[i].value.val_i64 = value
    arr[len(values)].key = b""  # NOTE: the list ends at the first empty key.
    return arr


def slice_stage(
    src: pathlib.Path,
    dst: pathlib.Path,
    *,
    n_layer: int,
    layers: tuple[int, int],
    quant: str,
    requantize: bool,
    stage_index: int,
    stage_count: int,
    threads: int = 0,
) -> None:
    """Write layers ``[start, end)`` of ``src`` to ``dst``, quantized to ``quant``."""
    ensure_backend()
    start, end = layers
    pruned = [i for i in range(n_layer) if not start <= i < end] + [-1]
    prune = (ctypes.c_int32 * len(pruned))(*pruned)
    overrides = _int_overrides(dict(zip(STAGE_KEYS, (stage_index, stage_count, start, end))))
    params = llama.llama_model_quantize_default_params()
    params.nthread = threads or (os.cpu_count() or 1)
    ftype = QUANT_FTYPES[quant]
    if ftype is None:
        params.only_copy = True
    else:
        params.ftype = ftype
        params.allow_requantize = requantize
    params.prune_layers = ctypes.cast(prune, ctypes.POINTER(ctypes.c_int32))
    params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama.llama_model_kv_override))
    rc = llama.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise SliceError(f"llama.cpp's quantizer failed on {src} (layers {start}:{end}, quant {quant}, code {rc})")


def _copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, drop=lambda name: False) -> None:
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or drop(field.name):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def rewrite_stage(path: pathlib.Path, *, keep_vocab: bool, keep_head: bool) -> None:
    """Rewrite a sliced stage in place without what it does not need.

    ``keep_vocab=False`` (middle and last-of-chain-without-embedding stages): tokenizer reduced to the
    ``none`` model and the token embedding to a single row. ``keep_head=False``: ``output.weight`` dropped
    (llama.cpp then falls back to the tied embedding, which a non-final stage never computes).
    """
    reader = gguf.GGUFReader(path)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = path.with_suffix(".rewrite")
    writer = gguf.GGUFWriter(tmp, arch=arch)
    try:
        if keep_vocab:
            _copy_fields(reader, writer)
        else:
            vocab_key = f"{arch}.vocab_size"
            _copy_fields(reader, writer, drop=lambda n: n.startswith("tokenizer.") or n == vocab_key)
            writer.add_tokenizer_model("none")
            writer.add_uint32(vocab_key, 1)
        tensors = []
        for t in reader.tensors:
            if t.name == "output.weight" and not keep_head:
                continue
            data = t.data
            shape = [int(x) for x in reversed(t.shape.tolist())]  # numpy order: [rows, cols]
            if t.name == "token_embd.weight" and not keep_vocab:
                data = data[:1]
                shape = [1, shape[-1]]
            tensors.append((t, data, shape))
        for t, data, shape in tensors:
            if data.dtype == np.uint8:  # quantized or bf16 rows come as raw bytes
                writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
            else:
                writer.add_tensor_info(t.name, shape, data.dtype, data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data, _ in tensors:
            writer.write_tensor_data(np.ascontiguousarray(data))
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
