"""The quantization names ``chatloop convert --quant`` takes (llama.cpp's quantizer does the work)."""

from __future__ import annotations

# "keep" copies tensors untouched; the others are llama_ftype targets (converters/slicer.py maps them).
QUANT_NAMES = ("keep", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")
