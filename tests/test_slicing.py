"""Slicing GGUF models into stages: manifest, stage file contents and sizes, loading, and conversion errors.

Stage files are read back with ``gguf.GGUFReader`` and compared with the source tensor by tensor, so these
tests check the converter against the file format rather than against its own bookkeeping.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import subprocess
import sys
from dataclasses import dataclass

import gguf
import numpy as np
import pytest

from chatloop.engine.handles import Model
from chatloop.engine.local_chain import LocalChain
from chatloop.engine.runtime import RuntimeOptions
from chatloop.engine.tokenizer import Tokenizer
from chatloop.modelfiles.manifest import MANIFEST_NAME, load_manifest
from converters.convert import ConvertRequest, convert
from converters.partition import balance
from tests.conftest import ROOT
from tests.models import TinyLlama, write_tiny_llama

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Source:
    path: pathlib.Path
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    tokenizer_model: str
    tied: bool
    layer_bytes: tuple[int, ...]  # bytes of blk.{i}.* tensors
    embd_bytes: int
    head_bytes: int  # output_norm (+ output.weight; for a tied model the embedding serves as head)
    blocks: dict[tuple[int, str], bytes]  # (layer, tensor suffix) -> raw bytes


def read_source(path: pathlib.Path) -> Source:
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    n_layer = reader.fields[f"{arch}.block_count"].contents()
    layer_bytes = [0] * n_layer
    blocks = {}
    embd = head = 0
    tied = True
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m:
            layer_bytes[int(m.group(1))] += int(t.n_bytes)
            blocks[(int(m.group(1)), m.group(2))] = t.data.tobytes()
        elif t.name == "token_embd.weight":
            embd = int(t.n_bytes)
        elif t.name in ("output.weight", "output_norm.weight"):
            head += int(t.n_bytes)
            tied = tied and t.name != "output.weight"
    return Source(
        path=path,
        arch=arch,
        n_layer=n_layer,
        n_embd=reader.fields[f"{arch}.embedding_length"].contents(),
        n_vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
        tokenizer_model=reader.fields["tokenizer.ggml.model"].contents(),
        tied=tied,
        layer_bytes=tuple(layer_bytes),
        embd_bytes=embd,
        head_bytes=head + (embd if tied else 0),
        blocks=blocks,
    )


@pytest.fixture(scope="module")
def sources(smollm2_gguf, tiny_llama_gguf) -> dict[str, Source]:
    return {"smol": read_source(smollm2_gguf), "tiny": read_source(tiny_llama_gguf)}


# (source, stages, layers): the same arguments as test_engine.py, so the session converts each once.
SPLITS = [
    ("smol", 2, None),
    ("smol", 3, "0:10,10:20,20:30"),
    ("smol", 4, None),
    ("tiny", 3, None),
    ("tiny", 4, "0:1,1:4,4:5,5:6"),
]
SPLIT_IDS = [f"{s}-{n}-{lay or 'balanced'}" for s, n, lay in SPLITS]


@pytest.fixture(scope="module", params=SPLITS, ids=SPLIT_IDS)
def converted(request, sources, stage_dir):
    name, stages, layers = request.param
    src = sources[name]
    return src, stages, layers, stage_dir(src.path, stages=stages, layers=layers)


def test_manifest_fields(converted):
    src, stages, layers, directory = converted
    raw = json.loads((directory / MANIFEST_NAME).read_text())
    assert raw["arch"] == src.arch == "llama"
    assert raw["n_layer"] == src.n_layer
    assert raw["n_embd"] == src.n_embd
    assert raw["n_vocab"] == src.n_vocab
    assert raw["quant"] == "keep"
    assert raw["source"]["kind"] == "gguf"
    assert pathlib.Path(raw["source"]["path"]) == src.path.resolve()
    assert raw["source"]["requantized"] is False
    ranges = [(s["layer_start"], s["layer_end"]) for s in raw["stages"]]
    if layers:
        assert ranges == [tuple(int(x) for x in part.split(":")) for part in layers.split(",")]
    else:
        # The default balances the weight bytes a token reads: the head counts on the last stage, the embedding (one
        # row read per token) nowhere.
        assert ranges == balance(src.layer_bytes, stages, 0, src.head_bytes)
    assert len(ranges) == stages and ranges[0][0] == 0 and ranges[-1][1] == src.n_layer
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for k, s in enumerate(raw["stages"]):
        path = directory / s["file"]
        assert s["index"] == k and s["file"] == f"stage-{k}.gguf"
        assert s["has_embedding"] is (k == 0)
        assert s["has_head"] is (k == stages - 1)
        assert s["has_vocab"] is (k in (0, stages - 1))
        assert s["size_bytes"] == path.stat().st_size
        assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # Nothing else is left in the folder (no .partial work area, no stray files).
    assert sorted(p.name for p in directory.iterdir()) == sorted([MANIFEST_NAME] + [s["file"] for s in raw["stages"]])
    assert load_manifest(directory).stages[-1].layer_end == src.n_layer


def test_stage_files_hold_their_layers_untouched(converted):
    src, stages, _, directory = converted
    manifest = load_manifest(directory)
    for s in manifest.stages:
        reader = gguf.GGUFReader(directory / s.file)
        field = reader.fields.get
        first, last = s.index == 0, s.index == stages - 1
        assert field(f"{src.arch}.block_count").contents() == s.layer_end - s.layer_start
        assert field("chatloop.stage_index").contents() == s.index
        assert field("chatloop.stage_count").contents() == stages
        assert (field("chatloop.layer_start").contents(), field("chatloop.layer_end").contents()) == (
            s.layer_start,
            s.layer_end,
        )
        tensors = {t.name: t for t in reader.tensors}
        # Every block of the range, renumbered from 0 and byte-identical (--quant keep copies).
        blocks = {}
        for name, t in tensors.items():
            m = _BLOCK.match(name)
            if m:
                blocks[(int(m.group(1)) + s.layer_start, m.group(2))] = t.data.tobytes()
        want = {key: data for key, data in src.blocks.items() if s.layer_start <= key[0] < s.layer_end}
        assert blocks.keys() == want.keys()
        assert all(blocks[k] == want[k] for k in want)
        embd = tensors["token_embd.weight"]
        model = field("tokenizer.ggml.model").contents()
        if first or last:
            assert model == src.tokenizer_model
            assert len(field("tokenizer.ggml.tokens").data) == src.n_vocab
            assert embd.n_bytes == src.embd_bytes
        else:
            # docs/design.md mechanism 5: a middle stage carries no vocabulary and a one-row embedding.
            assert model == "none"
            assert "tokenizer.ggml.tokens" not in reader.fields
            assert field(f"{src.arch}.vocab_size").contents() == 1
            assert [int(x) for x in embd.shape] == [src.n_embd, 1]
        if last:
            assert "output_norm.weight" in tensors
            assert ("output.weight" in tensors) is not src.tied
        else:
            assert "output.weight" not in tensors


def test_middle_stage_is_not_much_bigger_than_its_layers(sources, stage_dir, record_property):
    src = sources["smol"]
    for stages, layers in ((3, "0:10,10:20,20:30"), (4, None)):
        manifest = load_manifest(stage_dir(src.path, stages=stages, layers=layers))
        for s in manifest.stages[1:-1]:
            layer_bytes = sum(src.layer_bytes[s.layer_start : s.layer_end])
            ratio = s.size_bytes / layer_bytes
            record_property(f"middle_ratio_{stages}_{s.index}", ratio)
            assert ratio <= 1.02, f"stage {s.index} ({s.layer_start}:{s.layer_end}): {ratio:.4f} x its layers"


def test_stage_files_load_in_llama_cpp(converted):
    src, stages, _, directory = converted
    manifest = load_manifest(directory)
    for s in manifest.stages:
        with Model(directory / s.file) as model:
            assert model.n_layer == s.layer_end - s.layer_start
            assert model.n_embd == src.n_embd
            if s.has_vocab:
                assert model.n_vocab == src.n_vocab
    # The first stage's vocabulary tokenizes exactly like the source.
    text = "Hello world, once upon a time the capital of France was Paris."
    with_src, with_stage = Tokenizer(src.path), Tokenizer(directory / manifest.stages[0].file)
    try:
        assert with_stage.tokenize(text) == with_src.tokenize(text)
        assert with_stage.chat_template() == with_src.chat_template()
    finally:
        with_src.close()
        with_stage.close()


def test_quantizing_while_slicing(tiny_llama_gguf, stage_dir):
    directory = stage_dir(tiny_llama_gguf, stages=2, layers="0:3,3:6", quant="q8_0")
    manifest = load_manifest(directory)
    assert manifest.quant == "q8_0" and manifest.notes == []  # an F16 source: no re-quantization note
    for s in manifest.stages:
        reader = gguf.GGUFReader(directory / s.file)
        types = {t.tensor_type for t in reader.tensors if _BLOCK.match(t.name) and len(t.shape) > 1}
        assert types == {gguf.GGMLQuantizationType.Q8_0}
    with LocalChain(directory, RuntimeOptions(n_threads=2, n_ctx=256, max_sequences=1)) as chain:
        out = list(chain.generate_tokens([1, 40, 41, 42, 43], 8))
    assert len(out) >= 1


# -- errors -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, tiny_llama_gguf) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("bad-sources")
    junk = root / "junk.gguf"
    junk.write_text("this is not a model\n")
    truncated = root / "truncated.gguf"
    data = tiny_llama_gguf.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    header_only = root / "header-only.gguf"
    header_only.write_bytes(data[:200])
    falcon = write_tiny_llama(root / "falcon.gguf", TinyLlama(arch="falcon"))
    return {
        "junk": junk,
        "truncated": truncated,
        "header-only": header_only,
        "missing": root / "does-not-exist.gguf",
        "falcon": falcon,
        "tiny": tiny_llama_gguf,
    }


# name: (source, extra arguments, words the error line must contain)
ERROR_CASES = {
    "too-many-stages": ("tiny", ["--stages", "7"], ["--stages 7", "6 layers"]),
    "zero-stages": ("tiny", ["--stages", "0"], ["--stages 0"]),
    "layers-gap": ("tiny", ["--layers", "0:2,3:6"], ["gap"]),
    "layers-overlap": ("tiny", ["--layers", "0:3,2:6"], ["overlap"]),
    "layers-short": ("tiny", ["--layers", "0:3,3:5"], ["6 layers"]),
    "layers-past-end": ("tiny", ["--layers", "0:3,3:8"], ["6 layers"]),
    "layers-syntax": ("tiny", ["--layers", "0-3,3-6"], ["START:END"]),
    "junk-file": ("junk", [], ["not a GGUF"]),
    "truncated-file": ("truncated", [], ["truncated"]),
    "header-only-file": ("header-only", [], ["truncated"]),
    "missing-file": ("missing", [], ["no such file"]),
    "unsupported-arch": ("falcon", [], ["falcon", "not supported"]),
}


@pytest.fixture(scope="module")
def cli_errors(bad_sources, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, pathlib.Path]]:
    """Every error case run through ``chatloop convert`` at once (each process mostly waits on imports)."""
    root = tmp_path_factory.mktemp("cli-errors")
    running = {}
    for name, (src, args, _) in ERROR_CASES.items():
        out = root / name
        cmd = [sys.executable, "-m", "chatloop.cli", "convert", str(bad_sources[src]), "--out", str(out), *args]
        running[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE), out)
    results = {}
    for name, (proc, out) in running.items():
        try:
            # A hang guard only: twelve interpreters starting at once on a busy machine take their time.
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out)
    return results


def assert_nothing_complete(out: pathlib.Path) -> None:
    if out.exists():
        left = sorted(p.name for p in out.iterdir())
        assert MANIFEST_NAME not in left
        assert not [n for n in left if n.endswith(".gguf") or n.startswith(".partial")], left


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_cli_convert_error_is_one_line(cli_errors, case):
    result, out = cli_errors[case]
    _, _, words = ERROR_CASES[case]
    stderr = result.stderr.decode("utf-8", "replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, stderr
    assert lines[0].startswith("chatloop convert: error:"), lines[0]
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert result.stdout == b""
    assert_nothing_complete(out)


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_convert_api_error_leaves_no_output(bad_sources, tmp_path, case):
    src, args, _ = ERROR_CASES[case]
    kwargs = {}
    if args and args[0] == "--stages":
        kwargs["stages"] = int(args[1])
    elif args:
        kwargs["layers"] = args[1]
    with pytest.raises(ValueError if "layers" in kwargs else (RuntimeError, ValueError)):
        convert(ConvertRequest(source=str(bad_sources[src]), out=tmp_path / "out", **kwargs))
    assert_nothing_complete(tmp_path / "out")


def test_failed_conversion_keeps_an_earlier_complete_one(tiny_llama_gguf, tmp_path):
    out = tmp_path / "model"
    convert(ConvertRequest(source=str(tiny_llama_gguf), out=out, layers="0:3,3:6"))
    before = (out / MANIFEST_NAME).read_text()
    with pytest.raises(ValueError):
        convert(ConvertRequest(source=str(tiny_llama_gguf), out=out, layers="0:3,4:6"))
    assert (out / MANIFEST_NAME).read_text() == before
    manifest = load_manifest(out)
    assert all(hashlib.sha256((out / s.file).read_bytes()).hexdigest() == s.sha256 for s in manifest.stages)
    assert not (out / ".partial").exists()


def test_cli_convert_success(tiny_llama_gguf, tmp_path):
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "chatloop.cli", "convert", str(tiny_llama_gguf), "--stages", "3", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(out)
    assert len(manifest.stages) == 3
    # One line per stage on stdout: its file, layer range and size.
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, s in zip(lines, manifest.stages):
        assert s.file in line and f"{s.layer_start}:{s.layer_end}" in line


def test_source_tensor_bytes_add_up(sources):
    """A sanity check of the reference itself: blocks plus embedding and head are nearly the whole file."""
    for src in sources.values():
        total = sum(src.layer_bytes) + src.embd_bytes + src.head_bytes - (src.embd_bytes if src.tied else 0)
        assert 0.95 < total / src.path.stat().st_size <= 1.0
        assert np.all(np.array(src.layer_bytes) > 0)
