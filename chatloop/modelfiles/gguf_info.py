"""What a source GGUF holds, read with the ``gguf`` package before llama.cpp ever sees the file."""

from __future__ import annotations

import mmap
import pathlib
import re
import struct
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
        reader = open_gguf(path)
        # NOTE: a damaged header can also parse into values that fail later (undecodable strings, odd shapes):
        # everything read from the file stays inside this try.
        return _info(path, reader)
    except GGUFError:
        raise
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on damaged files
        raise GGUFError(f"{path}: unreadable or truncated GGUF ({type(exc).__name__}: {exc})") from exc


def open_gguf(path: pathlib.Path) -> gguf.GGUFReader:
    """gguf's reader on a file whose magic and header bounds were checked first; ``GGUFError`` otherwise."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (bad magic)")
    check_header_bounds(path)
    return gguf.GGUFReader(path)


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


# Bytes of each GGUF scalar value type (gguf's GGUFValueType numbering); 8 is a string, 9 an array.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8  # ggml has 4; anything far above is damage


class _Cursor:
    """Reads the GGUF header's integers, refusing any read past the end of the file."""

    def __init__(self, buf, order: str) -> None:
        self.buf, self.order, self.at = buf, order, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.at + n > len(self.buf):
            raise GGUFError(f"{what} at offset {self.at} runs past the end of the file ({len(self.buf)} bytes)")

    def int(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.at)
        self.at += n
        return value

    def skip_string(self, what: str) -> None:
        n = self.int("Q", what)
        self.need(n, what)
        self.at += n

    def skip_value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind in _SCALAR_BYTES:
            self.need(_SCALAR_BYTES[kind], what)
            self.at += _SCALAR_BYTES[kind]
        elif kind == _STRING:
            self.skip_string(what)
        elif kind == _ARRAY and depth == 0:
            item, count = self.int("I", what), self.int("Q", what)
            if item in _SCALAR_BYTES:
                self.need(count * _SCALAR_BYTES[item], what)
                self.at += count * _SCALAR_BYTES[item]
                return
            # Every string or nested array item takes 8 bytes at least: a count the file cannot hold is damage.
            self.need(count * 8, f"{what} ({count} items)")
            for _ in range(count):
                self.skip_value(item, what, depth + 1)
        else:
            raise GGUFError(f"{what}: unknown value type {kind} at offset {self.at}")


def check_header_bounds(path: pathlib.Path) -> None:
    """Walk the header (key-values, tensor infos) checking every count and length against the file's size.

    NOTE: gguf's reader does not: a damaged count makes it read past the end, where it gets empty arrays and
    keeps looping without advancing, growing its lists until memory runs out (found by tests/test_gguf_precheck.py,
    an array count overwritten with 2**63). So no count reaches it unchecked."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if len(buf) < 24:
            raise GGUFError(f"{path}: truncated GGUF header ({len(buf)} bytes)")
        (version,) = struct.unpack_from("<I", buf, 4)
        order = "<" if version & 0xFFFF else ">"  # a big-endian file's version reads as a multiple of 65536
        cur = _Cursor(buf, order)
        cur.at = 4
        version = cur.int("I", "version")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.int("Q", "tensor count"), cur.int("Q", "key-value count")
        try:
            for i in range(n_kv):
                cur.skip_string(f"key {i}")
                cur.skip_value(cur.int("I", f"type of key {i}"), f"value of key {i}")
            for i in range(n_tensors):
                cur.skip_string(f"name of tensor {i}")
                n_dims = cur.int("I", f"dimensions of tensor {i}")
                if n_dims > _MAX_DIMS:
                    raise GGUFError(f"tensor {i} claims {n_dims} dimensions")
                cur.need(8 * n_dims + 12, f"shape of tensor {i}")
                cur.at += 8 * n_dims + 12  # dims, type, data offset
        except GGUFError as exc:
            raise GGUFError(f"{path}: truncated or damaged GGUF header: {exc}") from None
