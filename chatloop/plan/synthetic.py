"""A standard synthetic workload for ``chatloop bench-host``: layers of a 1B-class llama as a middle stage.

Shape of Llama-3.2-1B's layers (n_embd 2048, n_ff 8192, 32 heads, 8 KV heads) at Q8_0 with random weights,
written straight as quantized blocks (no float weights are made, so writing takes seconds). Like a middle
stage of a chain (as ``converters.slicer.rewrite_stage`` writes them) it has no vocabulary and takes hidden
states, so only layers are timed.
"""

from __future__ import annotations

import pathlib

import gguf
import numpy as np

N_EMBD, N_FF, N_HEAD, N_HEAD_KV = 2048, 8192, 32, 8
_Q8_BLOCK, _Q8_BYTES = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]


def _q8_matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q8_0 rows as raw bytes ``[rows, cols / 32 * 34]``: an f16 scale then 32 int8 per block."""
    blocks = np.empty((rows, cols // _Q8_BLOCK, _Q8_BYTES), dtype=np.uint8)
    # Scale ~ 1/sqrt(cols)/64 keeps the residual stream of order one over a few layers (no inf/NaN to time).
    scale = np.float16(1.0 / (64.0 * np.sqrt(cols)))
    blocks[:, :, :2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
    blocks[:, :, 2:] = rng.integers(-127, 128, size=(rows, cols // _Q8_BLOCK, _Q8_BLOCK), dtype=np.int8).view(np.uint8)
    return blocks.reshape(rows, -1)


def write_synthetic_stage(path: pathlib.Path, n_layer: int, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    head_dim = N_EMBD // N_HEAD
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name(f"synthetic-1b-layer-x{n_layer}")
    w.add_context_length(4096)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("none")
    w.add_uint32("llama.vocab_size", 1)
    q8 = gguf.GGMLQuantizationType.Q8_0
    norm = np.ones(N_EMBD, dtype=np.float32)
    w.add_tensor("token_embd.weight", np.zeros((1, N_EMBD), dtype=np.float32))
    kv = N_HEAD_KV * head_dim
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm)
        for name, rows, cols in (
            ("attn_q", N_EMBD, N_EMBD),
            ("attn_k", kv, N_EMBD),
            ("attn_v", kv, N_EMBD),
            ("attn_output", N_EMBD, N_EMBD),
            ("ffn_gate", N_FF, N_EMBD),
            ("ffn_up", N_FF, N_EMBD),
            ("ffn_down", N_EMBD, N_FF),
        ):
            w.add_tensor(p + name + ".weight", _q8_matrix(rng, rows, cols), raw_dtype=q8)
        w.add_tensor(p + "ffn_norm.weight", norm)
    w.add_tensor("output_norm.weight", norm)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
