"""What a model weighs per layer at a given quantization, and what its KV cache costs per token.

MODEL may be a GGUF file, a folder written by ``chatloop convert``, a Hugging Face folder (only its
config.json is read: no weights are needed) or ``config.json`` itself, or a Hugging Face model id (only
config.json is fetched). Sizes at a quantization other than the file's own come from tensor shapes
(``quant_sizes``); "keep" uses a GGUF's actual tensor bytes.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
from dataclasses import dataclass

import gguf

from chatloop.modelfiles.gguf_info import GGUFError, open_gguf
from chatloop.modelfiles.manifest import MANIFEST_NAME, ManifestError, load_manifest
from chatloop.plan.quant_sizes import BASE_TYPES, tensor_bytes, tensor_type

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
QUANTS = ("keep", *BASE_TYPES)


class ShapeError(ValueError):
    """A model whose shape cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Tensor:
    name: str  # GGUF tensor name (layers numbered as in the whole model)
    shape: tuple[int, ...]  # GGML order: row length first
    n_bytes: int | None = None  # actual bytes in a GGUF; None when known only from a config


@dataclass(frozen=True)
class ModelShape:
    name: str  # model name for tables and file names
    arch: str  # llama.cpp architecture name
    source: str  # what to pass to chatloop convert; "" when MODEL cannot be converted (converted folder, config)
    quant: str  # quantization the sizes are for
    n_layer: int
    n_embd: int
    n_vocab: int
    layer_bytes: tuple[int, ...]  # weight bytes of each layer at quant
    embedding_bytes: int  # token embedding: held by the first stage, looked up (not streamed) per token
    head_bytes: int  # output norm + head (the embedding itself for tied models): held and streamed by the last stage
    tied: bool  # the head reuses the token embedding
    kv_bytes_per_token_layer: int  # f16 K and V of one position in one layer

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embedding_bytes + (0 if self.tied else self.head_bytes)


def load_shape(model: str, quant: str | None = None) -> ModelShape:
    """The shape of MODEL at ``quant`` (None: the file's own for GGUF and converted folders, q8_0 for HF)."""
    if quant is not None and quant not in QUANTS:
        raise ShapeError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    path = pathlib.Path(model).expanduser()
    if path.is_file() and path.suffix == ".json":
        return from_hf_config(_read_json(path), quant or "q8_0", name=path.parent.name, source="")
    if path.is_file():
        return from_gguf(path, quant or "keep")
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return from_converted(path, quant or "keep")
    if path.is_dir() and (path / "config.json").is_file():
        return from_hf_config(_read_json(path / "config.json"), quant or "q8_0", name=path.name, source=str(path))
    if path.exists():
        raise ShapeError(f"{model}: not a GGUF file, a converted folder, an HF folder or a config.json")
    if not _REPO_ID.match(model):
        raise ShapeError(f"{model}: no such file or folder, and not a Hugging Face model id (org/name)")
    return from_hf_config(_fetch_config(model), quant or "q8_0", name=model, source=model)


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShapeError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ShapeError(f"{path}: expected a JSON object")
    return data


def _fetch_config(repo_id: str) -> dict:
    from huggingface_hub import hf_hub_download  # noqa: PLC0415 - the hub client only for model ids

    try:
        local = hf_hub_download(repo_id, "config.json")
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated: one message for the user
        raise ShapeError(
            f"{repo_id}: cannot fetch config.json from the Hugging Face hub ({type(exc).__name__})"
        ) from None
    return _read_json(pathlib.Path(local))


# -- from tensors -----------------------------------------------------------------------------------------


def _shape_from_tensors(
    tensors: list[Tensor], *, name: str, arch: str, source: str, quant: str, n_layer: int, n_embd: int, kv: int
) -> ModelShape:
    names = {t.name for t in tensors}
    tied = "output.weight" not in names
    layer = [0] * n_layer
    embedding = head = 0
    n_vocab = 0

    def size(t: Tensor) -> int:
        if quant == "keep":
            if t.n_bytes is None:
                raise ShapeError(f"{name}: --quant keep needs a GGUF file (a config alone has no stored sizes)")
            return t.n_bytes
        return tensor_bytes(t.shape, tensor_type(t.name, t.shape, quant, n_layer, arch, tied))

    for t in tensors:
        m = _BLOCK.match(t.name)
        if m:
            i = int(m.group(1))
            if i >= n_layer:
                raise ShapeError(f"{name}: tensor {t.name} names a layer beyond the model's {n_layer}")
            layer[i] += size(t)
        elif t.name == "token_embd.weight":
            embedding = size(t)
            n_vocab = t.shape[1] if len(t.shape) > 1 else 0
        elif t.name in ("output.weight", "output_norm.weight"):
            head += size(t)
    if tied:
        head += embedding
    missing = [i for i, b in enumerate(layer) if b == 0]
    if missing:
        raise ShapeError(f"{name}: layers {missing[:8]} have no tensors")
    if embedding == 0:
        raise ShapeError(f"{name}: no token_embd.weight")
    return ModelShape(
        name=name,
        arch=arch,
        source=source,
        quant=quant,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        layer_bytes=tuple(layer),
        embedding_bytes=embedding,
        head_bytes=head,
        tied=tied,
        kv_bytes_per_token_layer=kv,
    )


def _gguf_tensors(path: pathlib.Path) -> tuple[gguf.GGUFReader, list[Tensor]]:
    try:
        reader = open_gguf(path)
        tensors = [Tensor(t.name, tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in reader.tensors]
    except GGUFError as exc:
        raise ShapeError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on damaged files
        raise ShapeError(f"{path}: unreadable or truncated GGUF ({type(exc).__name__}: {exc})") from None
    return reader, tensors


def _meta(reader: gguf.GGUFReader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


def _gguf_dims(path: pathlib.Path, reader: gguf.GGUFReader) -> tuple[str, int, int, int]:
    """``(arch, n_layer, n_embd, kv_bytes_per_token_layer)`` from a GGUF header."""
    arch = _meta(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ShapeError(f"{path}: missing general.architecture")
    ints = {}
    for key in ("block_count", "embedding_length", "attention.head_count"):
        v = _meta(reader, f"{arch}.{key}")
        if isinstance(v, list):
            v = v[0] if v else None  # per-layer arrays: the layers of the supported archs are uniform
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ShapeError(f"{path}: missing or invalid {arch}.{key}")
        ints[key] = v
    n_head = ints["attention.head_count"]
    n_head_kv = _meta(reader, f"{arch}.attention.head_count_kv") or n_head
    if isinstance(n_head_kv, list):
        n_head_kv = n_head_kv[0]
    head_k = _meta(reader, f"{arch}.attention.key_length") or ints["embedding_length"] // n_head
    head_v = _meta(reader, f"{arch}.attention.value_length") or ints["embedding_length"] // n_head
    return arch, ints["block_count"], ints["embedding_length"], int(n_head_kv) * (int(head_k) + int(head_v)) * 2


def from_gguf(path: pathlib.Path, quant: str = "keep") -> ModelShape:
    reader, tensors = _gguf_tensors(path)
    arch, n_layer, n_embd, kv = _gguf_dims(path, reader)
    name = _meta(reader, "general.name") or path.stem
    return _shape_from_tensors(
        tensors, name=str(name), arch=arch, source=str(path), quant=quant, n_layer=n_layer, n_embd=n_embd, kv=kv
    )


def from_converted(folder: pathlib.Path, quant: str = "keep") -> ModelShape:
    """Sizes from the stage files of a converted model (layers renumbered back to the whole model's)."""
    try:
        m = load_manifest(folder)
    except ManifestError as exc:
        raise ShapeError(str(exc)) from None
    tensors: list[Tensor] = []
    kv = 0
    for s in m.stages:
        reader, stage_tensors = _gguf_tensors(folder / s.file)
        if s.index == 0:
            _, _, _, kv = _gguf_dims(folder / s.file, reader)
        for t in stage_tensors:
            b = _BLOCK.match(t.name)
            if b:
                tensors.append(Tensor(f"blk.{int(b.group(1)) + s.layer_start}.{b.group(2)}", t.shape, t.n_bytes))
            elif (
                t.name == "token_embd.weight"
                and s.has_embedding
                or t.name in ("output.weight", "output_norm.weight")
                and s.has_head
            ):
                tensors.append(t)
    return _shape_from_tensors(
        tensors, name=m.model, arch=m.arch, source="", quant=quant, n_layer=m.n_layer, n_embd=m.n_embd, kv=kv
    )


# -- from a Hugging Face config ---------------------------------------------------------------------------

_HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def _cfg_int(config: dict, key: str, where: str, default: int | None = None) -> int:
    v = config.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ShapeError(f"{where}: config key {key!r} must be a whole number greater than 0, got {v!r}")
    return v


def from_hf_config(config: dict, quant: str, *, name: str, source: str) -> ModelShape:
    """Tensor shapes as ``chatloop convert`` writes them for this config (no weights needed)."""
    where = f"{name}/config.json"
    archs = config.get("architectures") or []
    arch = next((_HF_ARCHS[a] for a in archs if a in _HF_ARCHS), None)
    if arch is None:
        raise ShapeError(f"{where}: architectures {archs!r} not supported (supported: {', '.join(_HF_ARCHS)})")
    e = _cfg_int(config, "hidden_size", where)
    f = _cfg_int(config, "intermediate_size", where)
    n_layer = _cfg_int(config, "num_hidden_layers", where)
    n_head = _cfg_int(config, "num_attention_heads", where)
    n_kv = _cfg_int(config, "num_key_value_heads", where, n_head)
    vocab = _cfg_int(config, "vocab_size", where)
    d = config.get("head_dim") or e // n_head
    d = _cfg_int({"head_dim": d}, "head_dim", where)
    tied = bool(config.get("tie_word_embeddings", False))
    tensors = [Tensor("token_embd.weight", (e, vocab)), Tensor("output_norm.weight", (e,))]
    if not tied:
        tensors.append(Tensor("output.weight", (e, vocab)))
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [
            Tensor(p + "attn_norm.weight", (e,)),
            Tensor(p + "attn_q.weight", (e, n_head * d)),
            Tensor(p + "attn_k.weight", (e, n_kv * d)),
            Tensor(p + "attn_v.weight", (e, n_kv * d)),
            Tensor(p + "attn_output.weight", (n_head * d, e)),
            Tensor(p + "ffn_norm.weight", (e,)),
            Tensor(p + "ffn_gate.weight", (e, f)),
            Tensor(p + "ffn_up.weight", (e, f)),
            Tensor(p + "ffn_down.weight", (f, e)),
        ]
        if arch == "qwen2":
            tensors += [
                Tensor(p + f"attn_{x}.bias", (n,)) for x, n in (("q", n_head * d), ("k", n_kv * d), ("v", n_kv * d))
            ]
        if arch == "qwen3":
            tensors += [Tensor(p + "attn_q_norm.weight", (d,)), Tensor(p + "attn_k_norm.weight", (d,))]
    return _shape_from_tensors(
        tensors, name=name, arch=arch, source=source, quant=quant, n_layer=n_layer, n_embd=e, kv=n_kv * 2 * d * 2
    )
