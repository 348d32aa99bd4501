"""Benchmark ``chatloop convert`` on a 1B-shaped Llama in HF form: wall time and peak memory.

Writes a random-weight BF16 checkpoint (hidden 2048, 16 layers, intermediate 8192, vocab 32000, 32 heads
with 8 KV heads: about 1.1 B parameters, 2.2 GB of safetensors) into the cache once, then runs
``chatloop convert --quant q8_0 --stages 4`` in a subprocess while sampling the resident memory of the
whole process tree. The target is a peak RSS of at most 1.5 GB: the converter must stream tensors, never
hold the model.

    python scripts/bench_convert.py [--dir DIR] [--stages 4] [--quant q8_0] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]


def cache_root() -> pathlib.Path:
    root = os.environ.get("CHATLOOP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "chatloop")
    return pathlib.Path(root).expanduser()


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (``bytes_to_unicode``)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


def write_tokenizer(folder: pathlib.Path, vocab_size: int, rng: np.random.Generator) -> None:
    """A valid byte-level BPE of exactly ``vocab_size`` tokens: every merge joins two existing tokens into a
    new one, as training would (the vocabulary is random, which is all a speed test needs)."""
    tokens = SPECIALS + byte_alphabet()
    seen = set(tokens)
    merges = []
    pool = byte_alphabet()
    while len(tokens) < vocab_size:
        a, b = pool[rng.integers(len(pool))], pool[rng.integers(len(pool))]
        if a + b in seen or len(a + b) > 12:
            continue
        merges.append([a, b])
        tokens.append(a + b)
        pool.append(a + b)
        seen.add(a + b)
    tok = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, "special": True, "normalized": False} for i, t in enumerate(SPECIALS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}))


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    e, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = e // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,), "lm_head.weight": (v, e)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (e,),
            p + "post_attention_layernorm.weight": (e,),
            p + "self_attn.q_proj.weight": (e, e),
            p + "self_attn.k_proj.weight": (kv, e),
            p + "self_attn.v_proj.weight": (kv, e),
            p + "self_attn.o_proj.weight": (e, e),
            p + "mlp.gate_proj.weight": (ff, e),
            p + "mlp.up_proj.weight": (ff, e),
            p + "mlp.down_proj.weight": (e, ff),
        }
    return shapes


def write_bf16_safetensors(path: pathlib.Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """Stream random BF16 tensors into one safetensors file without holding more than a chunk in memory."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            n = int(np.prod(shape))
            for lo in range(0, n, 1 << 24):
                count = min(1 << 24, n - lo)
                x = rng.standard_normal(count, dtype=np.float32)
                x = 1.0 + 0.1 * x if len(shape) == 1 else 0.02 * x
                fh.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    tmp.replace(path)


def ensure_model(folder: pathlib.Path) -> pathlib.Path:
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    print(f"writing a random 1B-shaped BF16 Llama to {folder} (once) ...", flush=True)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    write_tokenizer(folder, CONFIG["vocab_size"], rng)
    write_bf16_safetensors(folder / "model.safetensors", tensor_shapes(CONFIG), rng)
    return folder


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=pathlib.Path, default=cache_root() / "bench-llama-1b-bf16", help="HF model folder")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--target-gb", type=float, default=1.5, help="peak RSS target")
    args = ap.parse_args()
    folder = ensure_model(args.dir)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        out = pathlib.Path(tmp) / "out"
        cmd = [sys.executable, "-m", "chatloop.cli", "--log-level", "WARNING", "convert", str(folder)]
        cmd += ["--out", str(out), "--quant", args.quant, "--stages", str(args.stages), "--threads", str(args.threads)]
        peak = 0
        done = threading.Event()
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT)
        ps = psutil.Process(child.pid)

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                try:
                    peak = max(peak, tree_rss(ps))
                except psutil.NoSuchProcess:
                    return
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = child.wait()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        # ru_maxrss of waited-for children is in KiB on Linux: the kernel's own high-water mark.
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        stage_bytes = sum(f.stat().st_size for f in out.glob("stage-*.gguf")) if rc == 0 else 0
    print(f"model: {folder} ({size / 1e9:.2f} GB BF16 safetensors)")
    print(f"chatloop convert --quant {args.quant} --stages {args.stages}: exit {rc}")
    print(f"wall time: {wall:.1f} s")
    print(
        f"peak RSS: {max(peak, maxrss) / 1e9:.2f} GB (sampled {peak / 1e9:.2f} GB, kernel high-water {maxrss / 1e9:.2f} GB)"
    )
    print(f"stage files: {stage_bytes / 1e9:.2f} GB")
    ok = rc == 0 and max(peak, maxrss) <= args.target_gb * 1e9
    print(f"target peak RSS <= {args.target_gb} GB: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
