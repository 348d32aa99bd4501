"""``chatloop convert``: a GGUF file, a local HF folder or an HF model id into stage files and a manifest.

Everything is written into ``<out>/.partial/`` first and moved into place only when every stage is
done; the manifest goes last, so a directory with a manifest is always complete.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
from dataclasses import dataclass

from chatloop import progress
from chatloop.modelfiles.gguf_info import SUPPORTED_ARCHS, GGUFError, GGUFInfo, read_gguf_info
from chatloop.modelfiles.manifest import MANIFEST_NAME, Manifest, StageEntry, sha256_file
from converters.errors import ConvertError
from converters.partition import balance, parse_layers
from converters.slicer import QUANT_FTYPES, rewrite_stage, slice_stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertRequest:
    source: str  # .gguf path, local HF folder, or HF model id
    out: pathlib.Path  # output directory
    stages: int = 2  # number of stages (ignored when layers is given)
    layers: str | None = None  # explicit "0:10,10:20" ranges
    quant: str | None = None  # None: "keep" for GGUF sources, "q8_0" for HF sources
    revision: str | None = None  # HF branch, tag or commit
    threads: int = 0  # quantizer threads; 0 = all cores


def plan_ranges(info: GGUFInfo, stages: int, layers: str | None) -> list[tuple[int, int]]:
    if layers:
        return parse_layers(layers, info.n_layer)
    if stages < 1 or stages > info.n_layer:
        raise ConvertError(f"--stages {stages}: the model has {info.n_layer} layers, so 1..{info.n_layer} stages")
    # NOTE: balanced by the weight bytes a token reads, i.e. its decode time on a memory-bound CPU: every layer and
    # the head are read whole, the embedding only one row (its memory sits on stage 0 all the same).
    return balance(info.layer_bytes, stages, 0, info.head_bytes)


def convert(req: ConvertRequest) -> Manifest:
    out = req.out
    partial = out / ".partial"
    if (out / MANIFEST_NAME).exists():
        log.info("replacing the converted model in %s", out)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    try:
        manifest = _convert_into(req, partial)
        for old in out.glob("stage-*.gguf"):
            old.unlink()
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        for s in manifest.stages:
            (partial / s.file).replace(out / s.file)
        manifest.write(out)
        return manifest
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _convert_into(req: ConvertRequest, work: pathlib.Path) -> Manifest:
    src = pathlib.Path(req.source)
    if src.suffix == ".gguf" or src.is_file():
        gguf_path, source_meta = src, {"kind": "gguf", "id": src.stem, "path": str(src.resolve())}
        quant = req.quant or "keep"
    else:
        from converters.hf import convert_hf_to_gguf, resolve_source  # noqa: PLC0415 - HF stack only when needed

        quant = req.quant or "q8_0"
        hf = resolve_source(req.source, req.revision)
        gguf_path = work / "full.gguf"
        intermediate = quant if quant in ("f32", "f16", "bf16") else "auto"
        convert_hf_to_gguf(hf.local_dir, gguf_path, intermediate)
        source_meta = {"kind": "hf", "id": hf.model_id, "revision": hf.revision, "path": str(hf.local_dir)}
    if quant not in QUANT_FTYPES:
        raise ConvertError(f"--quant {quant!r}: expected one of {', '.join(QUANT_FTYPES)}")
    try:
        info = read_gguf_info(gguf_path)
    except GGUFError as exc:
        raise ConvertError(str(exc)) from exc
    if info.arch not in SUPPORTED_ARCHS:
        raise ConvertError(
            f"{gguf_path}: architecture {info.arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    ranges = plan_ranges(info, req.stages, req.layers)
    notes = []
    requantize = quant != "keep" and info.quantized
    if requantize:
        notes.append(
            "source was already quantized: re-quantizing it loses quality; convert from F16/BF16 weights when you can"
        )
        log.warning("%s is already quantized; re-quantizing to %s loses quality", gguf_path, quant)
    entries = []
    n = len(ranges)
    stage_bar = progress.bar(n, "writing stages", unit="stage")
    for k, (lo, hi) in enumerate(ranges):
        name = f"stage-{k}.gguf"
        dst = work / name
        log.info("stage %d/%d: layers %d:%d -> %s (%s)", k + 1, n, lo, hi, name, quant)
        slice_stage(
            gguf_path,
            dst,
            n_layer=info.n_layer,
            layers=(lo, hi),
            quant=quant,
            requantize=requantize,
            stage_index=k,
            stage_count=n,
            threads=req.threads,
        )
        first, last = k == 0, k == n - 1
        if not last or not first:
            # Middle stages lose the vocabulary; a first stage of a chain loses an untied head.
            rewrite_stage(dst, keep_vocab=first or last, keep_head=last)
        entries.append(
            StageEntry(
                index=k,
                file=name,
                layer_start=lo,
                layer_end=hi,
                has_embedding=first,
                has_head=last,
                has_vocab=first or last,
                sha256=sha256_file(dst),
                size_bytes=dst.stat().st_size,
            )
        )
        stage_bar.update(1)
    stage_bar.close()
    (work / "full.gguf").unlink(missing_ok=True)
    source_meta["requantized"] = requantize
    return Manifest(
        model=source_meta.get("id") or info.name,
        arch=info.arch,
        n_layer=info.n_layer,
        n_embd=info.n_embd,
        n_vocab=info.n_vocab,
        quant=quant,
        source=source_meta,
        stages=tuple(entries),
        notes=notes,
    )
