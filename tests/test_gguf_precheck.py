"""The GGUF pre-check under damaged files, and ``chatloop stage`` refusing truncated, corrupted or mismatched
stage files before llama.cpp sees them."""

from __future__ import annotations

import json
import pathlib
import shutil
import struct
import subprocess
import tempfile

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatloop.modelfiles.gguf_info import GGUFError, GGUFInfo, read_gguf_info
from chatloop.modelfiles.manifest import MANIFEST_NAME
from tests.cluster_harness import chatloop_cmd, free_port, wait_ready
from tests.waiting import thread_cpu_seconds

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
# CPU seconds one pre-check may cost: a hostile header (huge counts, lengths) must not make it loop or allocate.
# NOTE: CPU time of the checking thread, not the wall clock, which a busy machine stretches.
SLOW_CALL_CPU_SECS = 5.0


def _write_small_gguf(path: pathlib.Path) -> pathlib.Path:
    """A two-layer llama-shaped GGUF of a few kB: every field the pre-check reads, nothing more."""
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_embedding_length(8)
    w.add_context_length(64)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "a", "b", "c"])
    w.add_token_scores([0.0] * 6)
    w.add_tensor("token_embd.weight", np.ones((6, 8), np.float32))
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(8, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", np.ones((8, 8), np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> bytes:
    return _write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf").read_bytes()


def _header_end(data: bytes) -> int:
    """Offset of the first tensor's data: where mutations do the most harm."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "x.gguf"
        path.write_bytes(data)
        return int(gguf.GGUFReader(path).data_offset)


def _check(data: bytes) -> GGUFInfo | None:
    """read_gguf_info on ``data``: a GGUFInfo or a GGUFError, at a small CPU cost; never another exception."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.gguf"
        path.write_bytes(data)
        with thread_cpu_seconds() as cpu:
            try:
                info = read_gguf_info(path)
            except GGUFError as exc:
                assert str(path) in str(exc)
                info = None
        assert cpu.seconds < SLOW_CALL_CPU_SECS
        return info


def test_the_small_file_passes(small_gguf):
    info = _check(small_gguf)
    assert info is not None and (info.arch, info.n_layer, info.n_embd, info.n_vocab) == ("llama", 2, 8, 6)
    assert info.tied_embeddings and not info.quantized


@FUZZ
@given(st.data())
def test_truncated_anywhere(small_gguf, data):
    n = data.draw(st.integers(0, len(small_gguf) - 1))
    assert _check(small_gguf[:n]) is None  # every cut loses a tensor's bytes at least


@FUZZ
@given(st.data())
def test_flipped_header_bytes(small_gguf, data):
    buf = bytearray(small_gguf)
    end = _header_end(small_gguf)
    for _ in range(data.draw(st.integers(1, 8))):
        buf[data.draw(st.integers(0, end - 1))] ^= data.draw(st.integers(1, 255))
    _check(bytes(buf))


@FUZZ
@given(st.data())
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # gguf's reader on hostile offsets
def test_hostile_integers_in_the_header(small_gguf, data):
    """Counts, lengths, types and dimensions overwritten with huge, negative-looking or random values."""
    buf = bytearray(small_gguf)
    end = _header_end(small_gguf)
    value = data.draw(st.sampled_from([2**64 - 1, 2**63, 2**32 - 1, 2**31, 10**12, 0, 1]) | st.integers(0, 2**64 - 1))
    width = data.draw(st.sampled_from([4, 8]))
    at = data.draw(st.sampled_from([4, 8, 16]) | st.integers(0, end - width))
    buf[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    _check(bytes(buf))


@FUZZ
@given(st.binary(max_size=256))
def test_any_bytes_after_the_magic(rest):
    _check(b"GGUF" + rest)


def _with_array_count(data: bytes, key: bytes, count: int) -> bytes:
    """``data`` with the item count of the array stored under ``key`` overwritten."""
    at = data.index(key) + len(key) + 4 + 4  # after the key: value type (array) and item type, then the count
    return data[:at] + struct.pack("<Q", count) + data[at + 8 :]


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda b: b"GGML" + b[4:], "bad magic"),
        (lambda b: b[:4] + struct.pack("<I", 99) + b[8:], "version 99 is not supported"),
        (lambda b: b[:8] + struct.pack("<Q", 2**63) + b[16:], "damaged GGUF header: name of tensor"),
        (lambda b: b[:16] + struct.pack("<Q", 2**63) + b[24:], "damaged GGUF header: key"),
        (lambda b: b[:100], "damaged GGUF header"),
        (lambda b: b"", "bad magic"),
        # gguf's own reader loops until memory runs out on this one (an array count past the end of the file)
        (lambda b: _with_array_count(b, b"tokenizer.ggml.tokens", 2**63), "damaged GGUF header: value of key"),
    ],
    ids=["magic", "version", "tensor-count", "kv-count", "truncated-header", "empty", "array-count"],
)
def test_named_damage(small_gguf, mutate, words):
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.gguf"
        path.write_bytes(mutate(small_gguf))
        with pytest.raises(GGUFError, match=words):
            read_gguf_info(path)


def test_block_count_beyond_the_tensors(tmp_path):
    """A block_count the file cannot hold is refused before per-layer tables are allocated (a damaged u32 count
    would ask for up to 2^32 entries; the test uses a harmless 100000)."""
    w = gguf.GGUFWriter(tmp_path / "m.gguf", arch="llama")
    w.add_block_count(100_000)
    w.add_embedding_length(8)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="block_count"):
        read_gguf_info(tmp_path / "m.gguf")


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf_info(tmp_path / "nope.gguf")


# -- chatloop stage on damaged stage files --------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_llama_gguf, stage_dir, tmp_path) -> pathlib.Path:
    out = tmp_path / "model"
    shutil.copytree(stage_dir(tiny_llama_gguf, stages=2), out)
    return out


def _stage(model: pathlib.Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = chatloop_cmd("stage", "--weights", str(model / "stage-1.gguf"), "--port", str(free_port()), *extra)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _flip(path: pathlib.Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _assert_refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("chatloop stage: error:"), proc.stderr
    for w in words:
        assert w in line, line


@pytest.mark.slow
def test_stage_refuses_damaged_files(model_copy):
    stage = model_copy / "stage-1.gguf"
    original = stage.read_bytes()

    stage.write_bytes(original[: len(original) // 2])
    _assert_refused(_stage(model_copy), "bytes, the manifest says", "truncated")
    _assert_refused(_stage(model_copy, "--no-verify"), "bytes, the manifest says")  # size is always checked

    stage.write_bytes(original)
    _flip(stage, len(original) - 10)  # inside the last tensor: only the sha256 can tell
    _assert_refused(_stage(model_copy), "sha256", "does not match", "--no-verify")

    stage.write_bytes(original)
    _flip(stage, 0)
    _assert_refused(_stage(model_copy, "--no-verify"), "not a GGUF file")

    stage.write_bytes(original[:16] + struct.pack("<Q", 2**62) + original[24:])  # key-value count
    _assert_refused(_stage(model_copy, "--no-verify"), "damaged GGUF header", "runs past the end of the file")

    shutil.copy(model_copy / "stage-0.gguf", stage)  # another stage's file under this name
    _assert_refused(_stage(model_copy), "the manifest says")

    stage.unlink()
    _assert_refused(_stage(model_copy), "no such file")


@pytest.mark.slow
def test_stage_refuses_a_file_the_manifest_does_not_list(model_copy):
    manifest = json.loads((model_copy / MANIFEST_NAME).read_text())
    manifest["stages"][1]["file"] = "other.gguf"
    (model_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    _assert_refused(_stage(model_copy), "not listed")


@pytest.mark.slow
def test_no_verify_skips_only_the_sha256(model_copy, spawn):
    stage = model_copy / "stage-1.gguf"
    _flip(stage, stage.stat().st_size - 10)
    port = free_port()
    proc = spawn(chatloop_cmd("stage", "--weights", str(stage), "--port", str(port), "--no-verify"), name="stage")
    wait_ready(f"http://127.0.0.1:{port}", proc, timeout=120)
