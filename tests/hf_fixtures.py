"""Hugging Face model folders for the conversion tests, written here (no model hub is reachable).

- ``write_tiny_model``: a random-weight Llama / Qwen2 / Qwen3 folder with a small byte-level BPE
  tokenizer trained on the spot with the ``tokenizers`` package, saved with ``safetensors``.
- ``rebuild_hf_from_gguf``: real weights in HF form, rebuilt from a GGUF (the SmolLM2 demo model):
  tensors dequantized with ``gguf.quants``, llama.cpp's Q/K row permutation undone, tokenizer.json and
  tokenizer_config.json written from the GGUF's vocabulary, merges and SmolLM2's pre-tokenizer.
- ``write_hf_cache``: a folder placed in an HF cache layout (``models--org--name/snapshots/<commit>``).
- ``sentencepiece_model``: a tiny SentencePiece ``tokenizer.model`` protobuf.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import struct

import gguf
import numpy as np
import safetensors
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from converters.hf.tokenizer import LLAMA3_REGEX, QWEN2_REGEX

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we're testing tokenizers!",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Once upon a time, in a land far away, there lived a dragon who loved numbers: 1, 2, 3, 42, 1337.",
    "Привет, мир! Как дела? Ελληνικά κείμενα. 你好，世界。こんにちは世界。مرحبا بالعالم",
    "    indented\tand\ttabbed    text   with   runs of spaces\n\n\nand newlines",
    "I've been told he's there; they'll say we'd done it. SHOUTING WORDS AND MiXeD CaSe.",
]

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


# -- safetensors ---------------------------------------------------------------------------------------


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), for writing BF16 checkpoints without torch."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def save_safetensors(tensors: dict[str, np.ndarray], path: pathlib.Path, dtype: str) -> None:
    """Write float32 arrays as ``dtype`` (F32, F16 or BF16) with the ``safetensors`` package."""
    keep = {}
    specs = {}
    for name, arr in tensors.items():
        if dtype == "BF16":
            data, st_dtype = to_bf16_bits(arr), "bfloat16"
        elif dtype == "F16":
            data, st_dtype = np.ascontiguousarray(arr, dtype=np.float16), "float16"
        else:
            data, st_dtype = np.ascontiguousarray(arr, dtype=np.float32), "float32"
        keep[name] = data
        specs[name] = safetensors.TensorSpec(
            dtype=st_dtype, shape=list(data.shape), data_ptr=data.ctypes.data, data_len=data.nbytes
        )
    safetensors.serialize_file(specs, str(path), metadata={"format": "pt"})


def save_sharded(tensors: dict[str, np.ndarray], folder: pathlib.Path, dtype: str, n_shards: int) -> None:
    names = list(tensors)
    per = -(-len(names) // n_shards)
    weight_map = {}
    for k in range(n_shards):
        part = names[k * per : (k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        save_safetensors({n: tensors[n] for n in part}, folder / fname, dtype)
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": sum(t.size for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# -- tokenizers ----------------------------------------------------------------------------------------


def train_tokenizer(kind: str, vocab_size: int = 384) -> Tokenizer:
    """A byte-level BPE trained on ``CORPUS`` with the pre-tokenizer of ``kind`` (llama3 or qwen2)."""
    regex, specials = (LLAMA3_REGEX, LLAMA3_SPECIALS) if kind == "llama3" else (QWEN2_REGEX, QWEN_SPECIALS)
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if kind == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


# -- tiny random models --------------------------------------------------------------------------------

TINY = {
    # hidden 64, 4 heads (2 KV heads), 4 layers; every width a multiple of 32 so q8_0 applies everywhere.
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        # Llama 3.1 style: exercises rope_freqs.weight (which every stage must carry).
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "use_sliding_window": False,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,  # not hidden/heads: exercises key_length/value_length
        "num_hidden_layers": 4,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
}


def tiny_weights(config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32 weights in HF layout for a TINY config."""
    e, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or e // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    kind = config["model_type"]

    def w(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    t = {"model.embed_tokens.weight": w(v, e, scale=0.5), "model.norm.weight": norm(e)}
    if not config["tie_word_embeddings"]:
        t["lm_head.weight"] = w(v, e, scale=0.2)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": norm(e),
            p + "post_attention_layernorm.weight": norm(e),
            p + "self_attn.q_proj.weight": w(q, e),
            p + "self_attn.k_proj.weight": w(kv, e),
            p + "self_attn.v_proj.weight": w(kv, e),
            p + "self_attn.o_proj.weight": w(e, q),
            p + "mlp.gate_proj.weight": w(ff, e),
            p + "mlp.up_proj.weight": w(ff, e),
            p + "mlp.down_proj.weight": w(e, ff),
        }
        if kind == "qwen2":
            t |= {
                p + "self_attn.q_proj.bias": w(q),
                p + "self_attn.k_proj.bias": w(kv),
                p + "self_attn.v_proj.bias": w(kv),
            }
        if kind == "qwen3":
            t |= {p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd)}
    return t


def write_tiny_model(
    folder: pathlib.Path, kind: str, *, dtype: str = "F32", shards: int = 1, seed: int = 0
) -> pathlib.Path:
    """A random-weight HF folder of family ``kind`` (llama, qwen2, qwen3) with its own tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer("llama3" if kind == "llama" else "qwen2")
    n_tok = tok.get_vocab_size()
    config = dict(TINY[kind])
    # Qwen pads its embedding past the tokenizer (151936 rows for 151665 tokens): so does the tiny one.
    config["vocab_size"] = n_tok if kind == "llama" else (n_tok // 32 + 2) * 32
    config["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
    if kind == "llama":
        bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")
        tok_config = {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "chat_template": LLAMA3_TEMPLATE,
            "clean_up_tokenization_spaces": True,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    else:
        bos, eos = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
        tok_config = {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "Qwen2Tokenizer",
        }
    config |= {"bos_token_id": bos, "eos_token_id": eos}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    weights = tiny_weights(config, np.random.default_rng(seed))
    if shards > 1:
        save_sharded(weights, folder, dtype, shards)
    else:
        save_safetensors(weights, folder / "model.safetensors", dtype)
    return folder


# -- real weights rebuilt from a GGUF ------------------------------------------------------------------

_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute`` (back to HF's rotate-half row order)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    return f.contents() if f is not None else None


def rebuild_hf_from_gguf(gguf_path: pathlib.Path, folder: pathlib.Path, dtype: str = "F16") -> pathlib.Path:
    """An HF Llama folder holding the weights and tokenizer of a llama-architecture GGUF (BPE vocab)."""
    folder.mkdir(parents=True, exist_ok=True)
    r = gguf.GGUFReader(gguf_path)
    arch = _field(r, "general.architecture")
    assert arch == "llama", arch
    n_head = _field(r, "llama.attention.head_count")
    n_head_kv = _field(r, "llama.attention.head_count_kv")
    tensors: dict[str, np.ndarray] = {}
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            hf = "model.embed_tokens"
        elif name == "output_norm":
            hf = "model.norm"
        elif name == "output":
            hf = "lm_head"
        else:
            _, bid, kind = name.split(".")
            hf = f"model.layers.{bid}.{_GGUF_TO_HF[kind]}"
            if kind == "attn_q":
                data = unpermute(data, n_head)
            elif kind == "attn_k":
                data = unpermute(data, n_head_kv)
        tensors[hf + ".weight"] = data
    tied = "lm_head.weight" not in tensors
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    merges = _field(r, "tokenizer.ggml.merges")

    def tok(key: str) -> str | None:
        i = _field(r, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": _field(r, "llama.embedding_length"),
        "intermediate_size": _field(r, "llama.feed_forward_length"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "num_hidden_layers": _field(r, "llama.block_count"),
        "max_position_embeddings": _field(r, "llama.context_length"),
        "rms_norm_eps": float(np.float32(_field(r, "llama.attention.layer_norm_rms_epsilon"))),
        "rope_theta": _field(r, "llama.rope.freq_base"),
        "vocab_size": len(tokens),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": _field(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(r, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    added = [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, ty in enumerate(types)
        if ty == gguf.TokenType.CONTROL
    ]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": SMOLLM_PRE_TOKENIZER,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ") for m in merges],
        },
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    tok_config = {
        "add_prefix_space": _field(r, "tokenizer.ggml.add_space_prefix") or False,
        "bos_token": tok("bos_token_id"),
        "eos_token": tok("eos_token_id"),
        "unk_token": tok("unknown_token_id"),
        "pad_token": tok("padding_token_id"),
        "chat_template": _field(r, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "GPT2Tokenizer",
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    save_safetensors(tensors, folder / "model.safetensors", dtype)
    return folder


# -- HF cache layout -----------------------------------------------------------------------------------


def write_hf_cache(hf_home: pathlib.Path, repo_id: str, source: pathlib.Path, commit: str) -> pathlib.Path:
    """Place ``source``'s files in ``hf_home``'s hub cache as ``repo_id`` at ``commit`` (branch main)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in source.iterdir():
        if f.is_file():
            # The real cache keeps content-addressed blobs and symlinks to them; a copy behaves the same.
            shutil.copy2(f, snapshot / f.name)
    return snapshot


# -- SentencePiece -------------------------------------------------------------------------------------


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_len(field: int, payload: bytes) -> bytes:
    return _pb_varint(field << 3 | 2) + _pb_varint(len(payload)) + payload


def sentencepiece_model(pieces: list[tuple[str, float, int]]) -> bytes:
    """A ``ModelProto`` with these (piece, score, type) entries and a BPE trainer spec."""
    out = bytearray()
    for piece, score, kind in pieces:
        body = _pb_len(1, piece.encode()) + _pb_varint(2 << 3 | 5) + struct.pack("<f", score)
        body += _pb_varint(3 << 3 | 0) + _pb_varint(kind)
        out += _pb_len(1, body)
    out += _pb_len(2, _pb_varint(3 << 3 | 0) + _pb_varint(2))  # trainer_spec.model_type = BPE
    return bytes(out)
