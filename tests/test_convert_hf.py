"""Hugging Face folders and model ids into stage GGUFs, held to references (real llama.cpp, no mocks).

- Tiny random Llama / Qwen2 / Qwen3 folders: the 2-stage chain is bit-exact with the whole converted
  model, and the f32 conversion agrees with a NumPy forward pass written from the HF definitions.
- Real weights: SmolLM2 rebuilt as an HF folder from its GGUF and converted back at f16.
- An HF id resolved offline from a pre-filled HF cache; errors as one line and exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from chatloop.demo import demo_gguf
from chatloop.engine.local_chain import LocalChain
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime
from chatloop.engine.tokenizer import Tokenizer
from chatloop.modelfiles.manifest import MANIFEST_NAME, load_manifest
from chatloop.protocol.messages import SeqStep
from converters.convert import ConvertRequest, convert
from converters.hf.safetensors_lazy import Checkpoint
from converters.hf.tokenizer import GPT2_REGEX, detect_pre_tokenizer
from tests.hf_fixtures import (
    SMOLLM_PRE_TOKENIZER,
    TINY,
    rebuild_hf_from_gguf,
    save_safetensors,
    sentencepiece_model,
    tiny_weights,
    write_hf_cache,
    write_tiny_model,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTS = RuntimeOptions(n_threads=2, n_ctx=512, max_sequences=1)
MIXED_TEXT = (
    "Hello world! It's 2024; I've 12345 apples... café naïve façade.\n\n"
    "    def f(x):\treturn x**2  # comment\n\tПривет, мир! Ελληνικά 你好世界 こんにちは 😀🚀 مرحبا\n"
    "<|im_start|>user\nWhat's 3.14159 * 2?<|im_end|>\n<|im_start|>assistant\n   trailing   \n\n\n"
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]
N_TOKENS = 32
# family -> safetensors dtype of its fixture: each stored dtype is exercised by one family.
KINDS = {"llama": "BF16", "qwen2": "F32", "qwen3": "F16"}


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny-hf")
    return {kind: write_tiny_model(root / kind, kind, dtype=dtype) for kind, dtype in KINDS.items()}


@pytest.fixture(scope="module")
def tiny_converted(tiny, tmp_path_factory) -> dict[str, dict[int, pathlib.Path]]:
    """Each tiny model converted at q8_0 as a whole (1 stage) and as a 2-stage chain."""
    root = tmp_path_factory.mktemp("tiny-out")
    out: dict[str, dict[int, pathlib.Path]] = {}
    for kind, folder in tiny.items():
        out[kind] = {}
        for n in (1, 2):
            convert(ConvertRequest(source=str(folder), out=root / f"{kind}-{n}", stages=n))
            out[kind][n] = root / f"{kind}-{n}"
    return out


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> dict[str, pathlib.Path]:
    """SmolLM2 rebuilt as an HF folder, converted back at f16; and llama.cpp's own f16 of the original GGUF
    sliced at the same layers, the reference for "same weights, same kernels"."""
    root = tmp_path_factory.mktemp("smol")
    hf = rebuild_hf_from_gguf(demo_gguf(), root / "hf", dtype="F16")
    ours = root / "converted"
    m = convert(ConvertRequest(source=str(hf), out=ours, stages=2, quant="f16"))
    layers = ",".join(f"{s.layer_start}:{s.layer_end}" for s in m.stages)
    ref = root / "reference"
    convert(ConvertRequest(source=str(demo_gguf()), out=ref, layers=layers, quant="f16"))
    return {"hf": hf, "ours": ours, "ref": ref}


# -- helpers -------------------------------------------------------------------------------------------


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatloop.cli", "--log-level", "WARNING", "convert", *args],
        cwd=ROOT,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def stage_runtimes(model_dir: pathlib.Path) -> list[StageRuntime]:
    m = load_manifest(model_dir)
    return [StageRuntime(model_dir / s.file, StageRole(s.has_embedding, s.has_head), OPTS) for s in m.stages]


def chain_step(stages: list[StageRuntime], pos: int, tokens: list[int]) -> tuple[int, np.ndarray]:
    data = np.array(tokens, np.int32)
    for st in stages:
        data = st.forward([SeqStep(0, pos, len(tokens), sample=True)], data)
    return data[0].token, stages[-1].logits(-1)


def reference_logits(folder: pathlib.Path, ids: list[int]) -> np.ndarray:
    """Last-token logits of the HF model in ``folder``, computed in float64 from the HF definitions
    (rotate-half RoPE with Llama 3 frequency scaling, GQA, Qwen biases and Q/K norms)."""
    cfg = json.loads((folder / "config.json").read_text())
    w = {n: r.to_f32().astype(np.float64) for n, r in Checkpoint(folder).tensors.items()}
    e, h, hkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or e // h
    eps = cfg["rms_norm_eps"]

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, d, 2) / d)
    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type") == "llama3":  # transformers' _compute_llama3_parameters
        f, lo, hi, old = (
            rs["factor"],
            rs["low_freq_factor"],
            rs["high_freq_factor"],
            rs["original_max_position_embeddings"],
        )
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled)
    t = len(ids)
    angles = np.arange(t)[:, None] * inv[None, :]
    angles = np.concatenate([angles, angles], -1)[:, None, :]
    cos, sin = np.cos(angles), np.sin(angles)

    def rope(x):
        return x * cos + np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        hs = rms(x, w[p + "input_layernorm.weight"])

        def proj(n, hs=hs, p=p):
            y = hs @ w[f"{p}self_attn.{n}_proj.weight"].T
            return y + w.get(f"{p}self_attn.{n}_proj.bias", 0.0)

        q, k, v = proj("q").reshape(t, h, d), proj("k").reshape(t, hkv, d), proj("v").reshape(t, hkv, d)
        if p + "self_attn.q_norm.weight" in w:
            q, k = rms(q, w[p + "self_attn.q_norm.weight"]), rms(k, w[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, h // hkv, 1), np.repeat(v, h // hkv, 1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(d) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", s, v).reshape(t, h * d) @ w[p + "self_attn.o_proj.weight"].T
        hs = rms(x, w[p + "post_attention_layernorm.weight"])
        g, u = hs @ w[p + "mlp.gate_proj.weight"].T, hs @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    return x[-1] @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def gguf_fields(path: pathlib.Path, prefixes: tuple[str, ...]) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if k.startswith(prefixes)}


# -- tiny random models --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_tiny_chain_is_bit_exact_with_whole_model(kind, tiny_converted):
    whole, two = tiny_converted[kind][1], tiny_converted[kind][2]
    m = load_manifest(two)
    assert (m.arch, m.quant, m.source["kind"], len(m.stages)) == (TINY[kind]["model_type"], "q8_0", "hf", 2)
    assert m.stages[0].layer_end == m.stages[1].layer_start
    full = stage_runtimes(whole)
    chain = stage_runtimes(two)
    try:
        prompt = [5, 77, 100, 200, 33, 7, 9, 150, 300, 11, 12, 13]
        a_tok, a = chain_step(full, 0, prompt)
        b_tok, b = chain_step(chain, 0, prompt)
        assert np.abs(a - b).max() == 0.0 and a_tok == b_tok
        pos = len(prompt)
        for _ in range(8):
            a_tok, a = chain_step(full, pos, [a_tok])
            b_tok, b = chain_step(chain, pos, [b_tok])
            assert np.abs(a - b).max() == 0.0 and a_tok == b_tok
            pos += 1
    finally:
        for st in full + chain:
            st.close()


@pytest.mark.parametrize("kind", list(KINDS))
def test_tiny_f32_conversion_matches_numpy_reference(kind, tiny, tmp_path):
    out = tmp_path / "f32"
    convert(ConvertRequest(source=str(tiny[kind]), out=out, stages=1, quant="f32"))
    ids = [5, 77, 100, 200, 33, 7, 9, 150, 300, 11, 12, 13, 40, 41, 42, 43]
    (rt,) = stage_runtimes(out)
    try:
        _, got = chain_step([rt], 0, ids)
    finally:
        rt.close()
    want = reference_logits(tiny[kind], ids)
    # llama.cpp keeps K and V in f16: ~1e-3 differences; a wrong permutation or missing bias gives ~1.
    assert np.abs(got - want).max() < 2e-2, np.abs(got - want).max()
    assert int(got.argmax()) == int(want.argmax())


def test_llama3_rope_freqs_match_transformers_scaling(tiny_converted):
    (rope,) = [
        t for t in gguf.GGUFReader(tiny_converted["llama"][2] / "stage-1.gguf").tensors if t.name == "rope_freqs.weight"
    ]
    cfg = TINY["llama"]
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    rs = cfg["rope_scaling"]
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, d, 2) / d)
    wavelen = 2 * math.pi / inv
    old, lo, hi, f = rs["original_max_position_embeddings"], rs["low_freq_factor"], rs["high_freq_factor"], rs["factor"]
    smooth = (old / wavelen - lo) / (hi - lo)
    scaled = np.where(
        wavelen < old / hi, inv, np.where(wavelen > old / lo, inv / f, (1 - smooth) * inv / f + smooth * inv)
    )
    # llama.cpp divides each RoPE frequency by its factor.
    np.testing.assert_allclose(np.asarray(rope.data), inv / scaled, rtol=1e-5)
    assert len(set(np.round(np.asarray(rope.data), 4))) >= 3  # all three regimes occur in this config


@pytest.mark.parametrize(("kind", "pre", "add_bos"), [("llama", "llama-bpe", True), ("qwen2", "qwen2", False)])
def test_tiny_tokenizer_matches_tokenizers_library(kind, pre, add_bos, tiny, tiny_converted):
    stage0 = tiny_converted[kind][2] / "stage-0.gguf"
    fields = gguf_fields(stage0, ("tokenizer.",))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.ggml.add_bos_token"] is add_bos
    assert (
        "<|im_start|>" in fields["tokenizer.chat_template"]
        or "<|start_header_id|>" in fields["tokenizer.chat_template"]
    )
    hf = HFTokenizer.from_file(str(tiny[kind] / "tokenizer.json"))
    config = json.loads((tiny[kind] / "config.json").read_text())
    assert fields["tokenizer.ggml.eos_token_id"] == config["eos_token_id"]
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]  # Qwen's padded rows included
    tok = Tokenizer(stage0)
    try:
        for text in (MIXED_TEXT, "  leading spaces", "x\n\n\ny", "1234567890 12 345"):
            assert tok.tokenize(text, add_special=False) == hf.encode(text, add_special_tokens=False).ids
        assert tok.tokenize("hi", add_special=True) == hf.encode("hi").ids
    finally:
        tok.close()


def test_sharded_checkpoint_converts_to_the_same_files(tmp_path):
    # Same folder name: it becomes general.name.
    single = write_tiny_model(tmp_path / "single" / "tiny", "llama", dtype="F16")
    sharded = write_tiny_model(tmp_path / "sharded" / "tiny", "llama", dtype="F16", shards=3)
    assert len(list(sharded.glob("model-*.safetensors"))) == 3
    a = convert(ConvertRequest(source=str(single), out=tmp_path / "a", stages=2))
    b = convert(ConvertRequest(source=str(sharded), out=tmp_path / "b", stages=2))
    assert [s.sha256 for s in a.stages] == [s.sha256 for s in b.stages]


def test_sentencepiece_tokenizer_model(tmp_path):
    # <unk>, <s>, </s>, the 256 byte pieces, then words reachable by merging pieces (higher score first).
    chars = ["▁", "h", "e", "l", "o", "w", "r", "d"]
    words = ["▁h", "▁he", "▁hel", "▁hell", "▁hello", "▁w", "▁wo", "▁wor", "▁worl", "▁world"]
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces += [(c, -100.0 - i, 1) for i, c in enumerate(chars)] + [(w, -1.0 - i, 1) for i, w in enumerate(words)]
    folder = tmp_path / "spm"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(sentencepiece_model(pieces))
    config = {**TINY["llama"], "vocab_size": 320, "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    save_safetensors(
        tiny_weights({**config, "model_type": "llama"}, np.random.default_rng(1)), folder / "model.safetensors", "F32"
    )
    out = tmp_path / "out"
    convert(ConvertRequest(source=str(folder), out=out, stages=1))
    fields = gguf_fields(out / "stage-0.gguf", ("tokenizer.",))
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"][: len(pieces)] == [p for p, _, _ in pieces]
    assert fields["tokenizer.ggml.tokens"][len(pieces)] == f"[PAD{len(pieces)}]"
    assert np.allclose(fields["tokenizer.ggml.scores"][: len(pieces)], [s for _, s, _ in pieces])
    assert fields["tokenizer.ggml.token_type"][: len(pieces)] == [t for _, _, t in pieces]
    ids = {p: i for i, (p, _, _) in enumerate(pieces)}
    tok = Tokenizer(out / "stage-0.gguf")
    try:
        assert tok.tokenize("hello world") == [1, ids["▁hello"], ids["▁world"]]
        # "z" is no piece: SentencePiece's byte fallback spells it as <0x7A>.
        assert tok.tokenize("hello z", add_special=False) == [ids["▁hello"], ids["▁"], ids["<0x7A>"]]
    finally:
        tok.close()


def test_pre_tokenizer_detection(caplog):
    split = {"type": "Split", "pattern": {"Regex": GPT2_REGEX}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    assert detect_pre_tokenizer({"type": "Sequence", "pretokenizers": [split, byte_level]}, {}) == "gpt-2"
    assert detect_pre_tokenizer({**byte_level, "use_regex": True}, {}) == "gpt-2"
    assert detect_pre_tokenizer(SMOLLM_PRE_TOKENIZER, {"clean_up_tokenization_spaces": False}) == "smollm"
    assert detect_pre_tokenizer(SMOLLM_PRE_TOKENIZER, {"clean_up_tokenization_spaces": True}) == "starcoder"
    odd = {"type": "Sequence", "pretokenizers": [{**split, "pattern": {"Regex": r"\p{L}+|\s+"}}, byte_level]}
    with caplog.at_level("WARNING"):
        assert detect_pre_tokenizer(odd, {}) == "gpt-2"
    assert "UNKNOWN PRE-TOKENIZER" in caplog.text and "'gpt-2'" in caplog.text


# -- real weights: SmolLM2 rebuilt in HF form ----------------------------------------------------------


def test_smollm2_weights_and_metadata_equal_llamacpp_own_f16(smol):
    """The HF round trip loses nothing: every tensor is byte-identical to what llama.cpp's quantizer makes of
    the original GGUF at f16, and the tokenizer and hyper-parameter metadata are the original's."""
    keys = ("tokenizer.", "llama.")
    for stage in ("stage-0.gguf", "stage-1.gguf"):
        ours, ref = gguf.GGUFReader(smol["ours"] / stage), gguf.GGUFReader(smol["ref"] / stage)
        assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
        for a, b in zip(ours.tensors, ref.tensors):
            assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
        converted = {k: f.contents() for k, f in ours.fields.items() if k.startswith(keys)}
        original = {k: f.contents() for k, f in ref.fields.items() if k.startswith(keys)}
        assert converted["tokenizer.ggml.pre"] == "smollm"
        for key, value in original.items():
            assert converted.get(key) == value, key


@pytest.fixture(scope="module")
def smol_reference():
    """The original Q4_1 GGUF in one process."""
    rt = StageRuntime(demo_gguf(), StageRole(True, True), OPTS)
    tok = Tokenizer(demo_gguf())
    yield rt, tok
    rt.close()
    tok.close()


def test_smollm2_greedy_generation_matches(smol, smol_reference):
    """Greedy 32 tokens on 5 prompts: the converted chain equals the original weights exactly, and tracks
    the original Q4_1 file as closely as a different kernel allows."""
    q4, tok = smol_reference
    ref_stages = stage_runtimes(smol["ref"])
    agree = total = 0
    try:
        with LocalChain(smol["ours"], OPTS) as chain:
            for prompt in PROMPTS:
                ids = tok.tokenize(prompt)
                ours = [t.token for t in chain.generate_tokens(ids, N_TOKENS)]
                # Same weights, same kernels: llama.cpp's f16 of the original GGUF, token for token.
                tokens, pos, ref = list(ids), 0, []
                for _ in range(len(ours)):
                    token, _ = chain_step(ref_stages, pos, tokens)
                    pos += len(tokens)
                    tokens = [token]
                    ref.append(token)
                for st in ref_stages:
                    st.release(0)
                assert ours == ref, prompt
                assert len(ours) == N_TOKENS or tok.is_eog(ours[-1])
                # Against the Q4_1 file itself, teacher-forced on its own greedy text: Q4_1 and f16 kernels
                # differ in the last bits, so the top token may flip only where Q4_1 itself nearly ties.
                q4.release(1)
                token = q4.forward([SeqStep(1, 0, len(ids), sample=True)], np.array(ids, np.int32))[0].token
                chain.forward([SeqStep(2, 0, len(ids), sample=True)], np.array(ids, np.int32))
                pos = len(ids)
                for _ in range(N_TOKENS):
                    lq, lf = q4.logits(-1), chain.stages[-1].logits(-1)
                    total += 1
                    if lq.argmax() == lf.argmax():
                        agree += 1
                    else:
                        top2 = np.sort(lq)[-2:]
                        assert top2[1] - top2[0] < 0.5, (prompt, top2)
                    assert np.corrcoef(lq, lf)[0, 1] > 0.99
                    nxt = q4.forward([SeqStep(1, pos, 1, sample=True)], np.array([token], np.int32))[0].token
                    chain.forward([SeqStep(2, pos, 1, sample=True)], np.array([token], np.int32))
                    token, pos = nxt, pos + 1
                chain.release(2)
    finally:
        for st in ref_stages:
            st.close()
    assert agree / total >= 0.9, (agree, total)


def test_smollm2_tokenization_matches_three_ways(smol, smol_reference):
    _, original = smol_reference
    hf = HFTokenizer.from_file(str(smol["hf"] / "tokenizer.json"))
    converted = Tokenizer(smol["ours"] / "stage-0.gguf")
    try:
        for text in (MIXED_TEXT, *PROMPTS, " \t \n leading and trailing \n\n"):
            want = hf.encode(text, add_special_tokens=False).ids
            assert converted.tokenize(text) == want
            assert original.tokenize(text) == want
    finally:
        converted.close()


# -- HF model ids --------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_env(hf_home: pathlib.Path) -> dict[str, str]:
    """An environment whose HF cache is ``hf_home`` and whose hub client never goes online."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def test_hf_id_resolved_from_offline_cache(tiny, tmp_path):
    hf_home = tmp_path / "hf-home"
    write_hf_cache(hf_home, "tiny-org/tiny-llama", tiny["llama"], COMMIT)
    out = tmp_path / "out"
    proc = run_cli("tiny-org/tiny-llama", "--out", str(out), "--stages", "2", env=hf_env(hf_home))
    assert proc.returncode == 0, proc.stderr
    m = load_manifest(out)
    assert m.model == "tiny-org/tiny-llama"
    assert m.source["kind"] == "hf" and m.source["id"] == "tiny-org/tiny-llama" and m.source["revision"] == COMMIT
    assert gguf_fields(out / "stage-0.gguf", ("general.name",))["general.name"] == "tiny-org/tiny-llama"


# -- errors --------------------------------------------------------------------------------------------


def _break(folder: pathlib.Path, how: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    if how == "unsupported architecture":
        config["architectures"] = ["GPTNeoXForCausalLM"]
    elif how == "shape mismatch":
        config["intermediate_size"] = 96
    elif how == "missing config":
        (folder / "config.json").unlink()
        return
    elif how == "missing tokenizer":
        (folder / "tokenizer.json").unlink()
    elif how == "missing weights":
        (folder / "model.safetensors").unlink()
    elif how == "missing tensor":
        from converters.hf.safetensors_lazy import read_file_index  # noqa: PLC0415

        refs = read_file_index(folder / "model.safetensors")
        kept = {n: r.to_f32() for n, r in refs.items() if n != "model.layers.1.mlp.up_proj.weight"}
        save_safetensors(kept, folder / "model.safetensors", "F32")
    elif how == "unsupported dtype":
        # An int8 (quantized-checkpoint style) tensor; written by hand since numpy-only safetensors needs it.
        import safetensors  # noqa: PLC0415

        data = np.zeros((4, 4), np.int8)
        spec = safetensors.TensorSpec(dtype="int8", shape=[4, 4], data_ptr=data.ctypes.data, data_len=data.nbytes)
        safetensors.serialize_file(
            {"model.layers.0.mlp.up_proj.weight_scale": spec}, str(folder / "model-extra.safetensors")
        )
        (folder / "model.safetensors").rename(folder / "model-main.safetensors")
    (folder / "config.json").write_text(json.dumps(config))


ERRORS = {
    "unsupported architecture": "architecture GPTNeoXForCausalLM is not supported; supported: LlamaForCausalLM",
    "shape mismatch": "but config.json implies [",
    "missing config": "no config.json",
    "missing tokenizer": "no tokenizer (expected tokenizer.json or tokenizer.model)",
    "missing weights": "no model weights (*.safetensors)",
    "missing tensor": "tensor model.layers.1.mlp.up_proj.weight is missing from the checkpoint",
    "unsupported dtype": "has dtype I8; supported: F32, F16, BF16",
}


@pytest.mark.parametrize("how", list(ERRORS))
def test_bad_folder_fails_with_one_clear_line(how, tiny, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny["llama"], folder)
    _break(folder, how)
    out = tmp_path / "out"
    proc = run_cli(str(folder), "--out", str(out))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("chatloop convert: error:")]
    assert len(lines) == 1 and ERRORS[how] in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / MANIFEST_NAME).exists() and not list(out.glob("*.gguf")) and not (out / ".partial").exists()


def test_offline_without_cache_fails_with_one_clear_line(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("nobody/absent-model", "--out", str(out), env=hf_env(tmp_path / "empty-hf"))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("chatloop convert: error:")]
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set and no cached copy" in lines[0], proc.stderr
    assert not (out / MANIFEST_NAME).exists()
