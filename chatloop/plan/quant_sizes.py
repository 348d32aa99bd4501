"""Bytes of a tensor after ``chatloop convert --quant Q``, without quantizing anything.

Mirrors the choices of llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp) for the types the
converter offers: 1-D tensors stay F32; q4_k_m is Q4_K with Q6_K for the output head and for ``attn_v`` /
``ffn_down`` of the layers ``use_more_bits`` picks (and Q5_K ``attn_v`` on 80-layer llamas, llama.cpp's
"70B" rule); q4_0 gets a Q6_K head; a row length the block size does not divide falls back as llama.cpp
does (Q4_K -> Q5_0, Q6_K -> Q8_0, else F16). Block sizes come from ``gguf.GGML_QUANT_SIZES``.
"""

from __future__ import annotations

from collections.abc import Sequence

import gguf

Q = gguf.GGMLQuantizationType

# --quant name -> the type of an ordinary 2-D weight. "keep" is handled by the caller (actual bytes).
BASE_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": Q.F32,
    "f16": Q.F16,
    "bf16": Q.BF16,
    "q8_0": Q.Q8_0,
    "q4_0": Q.Q4_0,
    "q4_k_m": Q.Q4_K,
}
# Largest first: the order in which "which quantization would fit" is tried.
QUANTS_BY_SIZE = ("f16", "q8_0", "q4_k_m", "q4_0")

_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M k-quants."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def tensor_type(
    name: str, shape: Sequence[int], quant: str, n_layer: int, arch: str, tied: bool
) -> gguf.GGMLQuantizationType:
    """The type ``name`` (GGUF naming, ``shape`` in GGML order: row length first) gets at ``quant``."""
    if quant not in BASE_TYPES:
        raise ValueError(f"quantization {quant!r}: expected one of {', '.join(BASE_TYPES)}")
    if len(shape) < 2:
        return Q.F32  # norms and biases are never quantized
    t = BASE_TYPES[quant]
    if t in (Q.F32, Q.F16, Q.BF16):
        return t
    is_head = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_head:
        if t != Q.Q8_0:
            t = Q.Q6_K
    elif quant == "q4_k_m" and name.startswith("blk."):
        i_layer = int(name.split(".")[1])
        if name.endswith("attn_v.weight"):
            if use_more_bits(i_layer, n_layer):
                t = Q.Q6_K
            elif arch == "llama" and n_layer == 80:
                t = Q.Q5_K
        elif name.endswith("ffn_down.weight") and use_more_bits(i_layer, n_layer):
            t = Q.Q6_K
    return _fitting(t, shape[0])


def _fitting(t: gguf.GGMLQuantizationType, row: int) -> gguf.GGMLQuantizationType:
    block = gguf.GGML_QUANT_SIZES[t][0]
    if row % block == 0:
        return t
    t = _FALLBACK.get(t, Q.F16)
    return t if row % gguf.GGML_QUANT_SIZES[t][0] == 0 else Q.F16


def tensor_bytes(shape: Sequence[int], t: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    n = 1
    for d in shape:
        n *= int(d)
    return n // block * size
