"""The benchmark's child processes: ``chatloop.launcher`` with the benchmarks' defaults, and their logs."""

from __future__ import annotations

import logging
import pathlib
import signal
import sys
import tempfile

from benchlib import ROOT
from chatloop.http_util import wait_http_ok
from chatloop.launcher import ChildProcess, ProcessGroup

log = logging.getLogger("bench")


class Children:
    """Processes this benchmark started: run from the repository root with unbuffered Python, output in
    ``logdir``, SIGTERM when the benchmark dies (even by SIGKILL); ``stop`` ends their process groups."""

    def __init__(self, logdir: pathlib.Path) -> None:
        self.logdir = logdir
        self.group = ProcessGroup(logdir, die_with_parent=True)

    def start(
        self, name: str, cmd: list[str], env: dict[str, str | None] | None = None, cwd: pathlib.Path | None = None
    ) -> ChildProcess:
        """Start ``cmd``; ``env`` adds variables, and a value of None removes one inherited from this process;
        ``cwd``: another checkout of the repository to run (``python -m chatloop...`` imports it first)."""
        return self.group.start(cmd, env={"PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd or ROOT, name=name)

    def stop(self, procs: list[ChildProcess] | None = None, grace: float = 10.0) -> None:
        """SIGTERM every group of ``procs`` (default: all) at once, SIGKILL what is left after ``grace`` s."""
        self.group.stop(procs, grace=grace)


def tail(proc: ChildProcess, n: int = 20) -> str:
    """The last ``n`` lines of a child's log."""
    try:
        lines = pathlib.Path(proc.log_path).read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])
    except (OSError, TypeError):
        return ""


def wait_http(url: str, proc: ChildProcess, timeout: float = 180.0) -> None:
    """Wait until GET ``url`` answers 200 (or fail when ``proc`` exits), showing the end of its log on failure."""
    wait_http_ok(url, proc.popen, timeout, detail=lambda: tail(proc))


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that ``finally`` blocks stop the children."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="chatloop-bench-")
