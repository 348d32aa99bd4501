"""What a source GGUF holds, read with the ``gguf`` package before llama.cpp ever sees the file."""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass

import gguf

# Architectures whose layers are uniform and whose graphs need no per-stage adjustment (docs/design.md, mechanism 8).
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")

_BLOCK = re.compile(r"^blk\.(\d+)\.")


class GGUFError(ValueError):
    """A GGUF file that is unreadable, truncated or of an unsupported kind."""


@dataclass(frozen=True)
class GGUFInfo:
    path: pathlib.Path
    arch: str
    name: str
    n_layer: int
    n_embd: int
    n_vocab: int
    file_type: int | None  # general.file_type (llama_ftype), when recorded
    layer_bytes: tuple[int, ...]  # weight bytes of each block
    embedding_bytes: int  # token_embd.weight
    head_bytes: int  # output.weight + output_norm.weight (for tied models the embedding serves as head)
    tied_embeddings: bool  # no output.weight: the head reuses token_embd.weight
    quantized: bool  # any 2-D weight already below 16 bits


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


def read_gguf_info(path: str | pathlib.Path) -> GGUFInfo:
    """Parse and sanity-check a GGUF header; raise ``GGUFError`` naming the problem."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise GGUFError(f"{path}: not a GGUF file (bad magic)")
        reader = gguf.GGUFReader(path)
        # NOTE: a damaged header can also parse into values that fail later (undecodable strings, odd shapes):
        # everything read from the file stays inside this try.
        return _info(path, reader)
    except GGUFError:
        raise
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on damaged files
        raise GGUFError(f"{path}: unreadable or truncated GGUF ({type(exc).__name__}: {exc})") from exc


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _info(path: pathlib.Path, reader: gguf.GGUFReader) -> GGUFInfo:
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: missing general.architecture")
    n_layer = _field(reader, f"{arch}.block_count")
    n_embd = _field(reader, f"{arch}.embedding_length")
    if not _is_count(n_layer) or not _is_count(n_embd):
        raise GGUFError(f"{path}: missing or invalid {arch}.block_count / {arch}.embedding_length")
    if n_layer > len(reader.tensors):
        # Checked before allocating per-layer tables: a damaged count must not ask for billions of entries.
        raise GGUFError(f"{path}: {arch}.block_count is {n_layer} but the file holds {len(reader.tensors)} tensors")
    size = path.stat().st_size
    layer_bytes = [0] * n_layer
    embedding = head = 0
    has_output = False
    quantized = False
    low_bit = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    n_vocab = 0
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path}: truncated (tensor {t.name} ends past the end of the file)")
        m = _BLOCK.match(t.name)
        if m:
            idx = int(m.group(1))
            if idx >= n_layer:
                raise GGUFError(f"{path}: tensor {t.name} names a layer beyond block_count={n_layer}")
            layer_bytes[idx] += int(t.n_bytes)
        elif t.name == "token_embd.weight":
            embedding = int(t.n_bytes)
            n_vocab = int(t.shape[1]) if len(t.shape) > 1 else 0
        elif t.name in ("output.weight", "output_norm.weight"):
            head += int(t.n_bytes)
            has_output = has_output or t.name == "output.weight"
        if len(t.shape) > 1 and t.tensor_type not in low_bit:
            quantized = True
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        n_vocab = len(tokens.data)
    if any(b == 0 for b in layer_bytes):
        missing = [i for i, b in enumerate(layer_bytes) if b == 0]
        raise GGUFError(f"{path}: layers {missing[:8]} have no tensors")
    name = _field(reader, "general.name") or path.stem
    ftype = _field(reader, "general.file_type")
    return GGUFInfo(
        path=path,
        arch=arch,
        name=str(name),
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        file_type=int(ftype) if isinstance(ftype, int) else None,
        layer_bytes=tuple(layer_bytes),
        embedding_bytes=embedding,
        head_bytes=head + (0 if has_output else embedding),
        tied_embeddings=not has_output,
        quantized=quantized,
    )
