"""``partition_metadata.json``: what a converted model directory holds, written last so its presence means complete."""

from __future__ import annotations

import hashlib
import json
import pathlib
from dataclasses import asdict, dataclass, field

MANIFEST_NAME = "partition_metadata.json"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class StageEntry:
    index: int  # position in the chain, from 0
    file: str  # file name relative to the manifest
    layer_start: int  # first layer of the source model held (inclusive)
    layer_end: int  # end of the held range (exclusive)
    has_embedding: bool  # takes token ids
    has_head: bool  # produces logits
    has_vocab: bool  # carries the tokenizer
    sha256: str  # hex digest of the file
    size_bytes: int  # file size


@dataclass(frozen=True)
class Manifest:
    model: str  # model name (HF id or file stem)
    arch: str  # llama.cpp architecture name
    n_layer: int  # layers of the whole model
    n_embd: int  # hidden size: the width of the rows passed between stages
    n_vocab: int  # vocabulary size
    quant: str  # quantization of the stage files
    source: dict  # kind ("gguf" | "hf"), path or id, revision, requantized
    stages: tuple[StageEntry, ...]
    chatloop_version: str = "0.1.0"
    format: int = FORMAT_VERSION
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        d["stages"] = [asdict(s) for s in self.stages]
        return json.dumps(d, indent=2) + "\n"

    def write(self, directory: pathlib.Path) -> pathlib.Path:
        path = directory / MANIFEST_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path


def sha256_file(path: pathlib.Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(directory: str | pathlib.Path) -> Manifest:
    """Read and check a model directory's manifest; ``ManifestError`` names what is wrong."""
    directory = pathlib.Path(directory)
    path = directory / MANIFEST_NAME if directory.is_dir() else directory
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (is this a directory written by 'chatloop convert'?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    try:
        if raw.get("format") != FORMAT_VERSION:
            raise ManifestError(f"{path}: format {raw.get('format')!r}, expected {FORMAT_VERSION}")
        stages = tuple(StageEntry(**s) for s in raw["stages"])
        m = Manifest(**{**raw, "stages": stages})
    except ManifestError:
        raise
    except (KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{path}: missing or unexpected field ({exc})") from exc
    if not m.stages:
        raise ManifestError(f"{path}: no stages")
    expected = 0
    for i, s in enumerate(m.stages):
        if s.index != i or s.layer_start != expected or s.layer_end <= s.layer_start:
            raise ManifestError(f"{path}: stage {i} has a bad index or layer range {s.layer_start}:{s.layer_end}")
        expected = s.layer_end
    if expected != m.n_layer or not m.stages[0].has_embedding or not m.stages[-1].has_head:
        raise ManifestError(f"{path}: stages do not cover the model's {m.n_layer} layers end to end")
    return m


def stage_path(directory: pathlib.Path, entry: StageEntry) -> pathlib.Path:
    return pathlib.Path(directory) / entry.file
