"""Safetensors checkpoints read lazily, one tensor at a time, from memory-mapped files.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length
``N``, ``N`` bytes of JSON mapping each tensor name to ``dtype``, ``shape`` and ``data_offsets`` (relative
to the end of the header), then the raw little-endian data. Parsing it here keeps torch and the
``safetensors`` package out of the runtime, and lets each tensor be mapped on its own: a mapping is dropped
as soon as its tensor is written, so resident memory stays near one tensor, never the whole model.
"""

from __future__ import annotations

import json
import logging
import pathlib
import struct
from dataclasses import dataclass

import numpy as np

from converters.errors import ConvertError

log = logging.getLogger(__name__)

# Safetensors dtype -> numpy storage dtype. NumPy has no bfloat16: BF16 is kept as its raw uint16 bits.
DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation refuses larger headers too


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live; nothing is read until ``raw()`` or ``to_f32()``."""

    name: str
    dtype: str  # "F32", "F16" or "BF16"
    shape: tuple[int, ...]
    path: pathlib.Path
    offset: int  # absolute byte offset of the data in ``path``
    nbytes: int

    def raw(self) -> np.ndarray:
        """A read-only memory map of the tensor in its stored dtype (BF16 as uint16 bits)."""
        if self.nbytes == 0:
            return np.zeros(self.shape, dtype=DTYPES[self.dtype])
        return np.memmap(self.path, dtype=DTYPES[self.dtype], mode="r", offset=self.offset, shape=self.shape)

    def to_f32(self) -> np.ndarray:
        return to_f32(self.raw(), self.dtype)


def to_f32(data: np.ndarray, dtype: str) -> np.ndarray:
    """Widen stored data to float32 (exact for every supported dtype)."""
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: shift the bits back into place.
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32, copy=False)


def _read_header(path: pathlib.Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path.name}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ConvertError(f"{path.name}: not a safetensors file or truncated (header of {n} bytes)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path.name}: damaged safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ConvertError(f"{path.name}: damaged safetensors header (not a JSON object)")
    return header, 8 + n


def read_file_index(path: pathlib.Path) -> dict[str, TensorRef]:
    """Every tensor of one safetensors file, checked against the file's size."""
    header, base = _read_header(path)
    size = path.stat().st_size
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConvertError(f"{path.name}: damaged header entry for {name}") from exc
        if dtype not in DTYPES:
            raise ConvertError(
                f"{path.name}: tensor {name} has dtype {dtype}; supported: {', '.join(DTYPES)} "
                "(quantized or integer checkpoints cannot be converted)"
            )
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - start != nbytes or start < 0:
            raise ConvertError(f"{path.name}: tensor {name} has {end - start} bytes for shape {list(shape)} {dtype}")
        if base + end > size:
            raise ConvertError(f"{path.name}: truncated (tensor {name} ends past the end of the file)")
        refs[name] = TensorRef(name, dtype, shape, path, base + start, nbytes)
    return refs


class Checkpoint:
    """All tensors of a model folder: one ``model.safetensors`` or shards listed in the index file."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self.files, index = self._locate()
        self.tensors: dict[str, TensorRef] = {}
        for f in self.files:
            for name, ref in read_file_index(f).items():
                if name in self.tensors:
                    raise ConvertError(
                        f"{folder}: tensor {name} appears in both {self.tensors[name].path.name} and {f.name}"
                    )
                self.tensors[name] = ref
        if index is not None:
            missing = sorted(set(index) - set(self.tensors))
            if missing:
                raise ConvertError(
                    f"{INDEX_NAME} lists {len(missing)} tensors the shards do not hold, e.g. {missing[0]}"
                )
        log.info("%s: %d tensors in %d safetensors file(s)", folder, len(self.tensors), len(self.files))

    def _locate(self) -> tuple[list[pathlib.Path], dict[str, str] | None]:
        """The weight files, and the index's tensor -> shard map when the checkpoint is sharded."""
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConvertError(f"{index}: unreadable shard index ({exc})") from exc
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise ConvertError(f"{self.folder}: shard {missing[0]} named in {INDEX_NAME} is missing")
            return [self.folder / n for n in names], weight_map
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [single], None
        files = sorted(self.folder.glob("model-*.safetensors")) or sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{self.folder}: no model weights (*.safetensors)")
        return files, None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]

    def main_dtype(self) -> str:
        """The dtype of the first 2-D tensor: what the checkpoint was saved in (config.json's
        ``torch_dtype`` is not trusted; fine-tunes often misstate it)."""
        for ref in self.tensors.values():
            if len(ref.shape) >= 2:
                return ref.dtype
        return "F32"

    def total_bytes(self) -> int:
        return sum(ref.nbytes for ref in self.tensors.values())
