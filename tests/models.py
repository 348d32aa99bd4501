"""Tiny random-weight GGUF models written with the ``gguf`` package, for tests that need a model of a chosen shape.

The weights are random, so the text they produce is noise; what matters is that llama.cpp loads the file
through the same code paths as a real llama (SentencePiece-style vocabulary with byte fallback, GQA
attention, SwiGLU feed-forward, untied or tied output head).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import gguf
import numpy as np

# Word pieces after the control and byte tokens: enough for tokenize() to find multi-byte matches.
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "an",
    "be",
    "this",
    "are",
    "or",
    "his",
    "which",
    "had",
    "not",
    "but",
    "were",
    "her",
    "one",
    "all",
    "has",
    "they",
    "their",
    "been",
    "more",
    "there",
    "would",
    "can",
    "will",
    "about",
    "who",
    "also",
    "into",
    "its",
    "only",
    "time",
    "new",
    "some",
    "hello",
    "world",
    "once",
    "upon",
    "a",
    "capital",
    "france",
    "paris",
    "cat",
    "dog",
    "story",
]


@dataclass(frozen=True)
class TinyLlama:
    n_layer: int = 6  # transformer blocks
    n_embd: int = 64  # hidden size
    n_head: int = 4  # query heads
    n_head_kv: int = 2  # key/value heads (GQA when below n_head)
    n_ff: int = 128  # feed-forward width
    n_ctx_train: int = 1024  # context length written into the file
    tied: bool = False  # True: no output.weight, the head reuses token_embd.weight
    f16: bool = True  # 2-D weights in F16 (norms stay F32, as llama.cpp's converter writes them)
    seed: int = 0  # weight seed
    arch: str = "llama"  # architecture name written into the file (tests of unsupported archs change it)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece ("llama") vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then word pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    # NOTE: llama.cpp's SPM tokenizer falls back to <0xXX> tokens for unknown bytes and looks up <0x0A> at load.
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    # NOTE: the SPM tokenizer only merges pairs whose union is a token, so every prefix of a word must exist.
    for word in _WORDS:
        for end in range(1, len(word) + 1):
            piece = "\u2581" + word[:end]
            if piece not in pieces:
                pieces.append(piece)
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # Longer pieces score higher so the SPM merge prefers whole words.
    scores = [0.0] * (3 + 256) + [-100.0 + len(p) for p in pieces]
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(path: str | pathlib.Path, spec: TinyLlama | None = None) -> pathlib.Path:
    """Write a random-weight llama-architecture GGUF of shape ``spec`` to ``path``."""
    spec = spec or TinyLlama()
    path = pathlib.Path(path)
    rng = np.random.default_rng(spec.seed)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    head_dim = spec.n_embd // spec.n_head
    n_kv = spec.n_head_kv * head_dim

    w = gguf.GGUFWriter(path, arch=spec.arch)
    w.add_name(f"tiny-{spec.arch}-{spec.n_layer}x{spec.n_embd}")
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if spec.f16 else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def matrix(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        # Weights of unit-ish gain so activations neither vanish nor explode over a few layers, and the
        # logits are peaked enough that greedy choices are not near-ties.
        m = rng.standard_normal((rows, cols), dtype=np.float32) * (scale / np.sqrt(cols))
        return m.astype(np.float16) if spec.f16 else m

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(spec.n_embd)).astype(np.float32)

    w.add_tensor("token_embd.weight", matrix(n_vocab, spec.n_embd, scale=np.sqrt(spec.n_embd)))
    for i in range(spec.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.attn_q.weight", matrix(spec.n_embd, spec.n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", matrix(n_kv, spec.n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", matrix(n_kv, spec.n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", matrix(spec.n_embd, spec.n_embd, scale=0.5))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(spec.n_ff, spec.n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", matrix(spec.n_ff, spec.n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", matrix(spec.n_embd, spec.n_ff, scale=0.5))
    w.add_tensor("output_norm.weight", norm())
    if not spec.tied:
        w.add_tensor("output.weight", matrix(n_vocab, spec.n_embd, scale=4.0))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
