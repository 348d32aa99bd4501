"""chatloop.launcher: children in their own sessions, stopped with their whole process group.

Real processes throughout; every wait polls a state with a generous deadline, nothing is timed."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from chatloop.launcher import ChildProcess, ProcessGroup, child_env, stop_together
from tests.cluster_harness import Processes, log_tail, wait_until

DEADLINE = 60.0  # seconds; generous, only a hung machine comes near it

# Ignores SIGTERM, says so, then sleeps: only SIGKILL ends it.
IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def log_text(path: pathlib.Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_line(path: pathlib.Path, prefix: str) -> str:
    """The first line of ``path`` that starts with ``prefix``, once the child has written it."""

    def find():
        return next((line for line in log_text(path).splitlines() if line.startswith(prefix)), None)

    return wait_until(find, timeout=DEADLINE, interval=0.02, what=f"a line {prefix!r} in {path}")


@pytest.fixture
def group(tmp_path):
    g = ProcessGroup(tmp_path)
    yield g
    g.stop(grace=0)


def test_child_ignoring_sigterm_is_killed(group):
    child = group.start(python(IGNORES_SIGTERM), name="stubborn")
    wait_for_line(child.log_path, "ready")
    assert child.alive()
    status = child.stop(grace=0.2)
    assert status == -signal.SIGKILL
    assert not child.alive()
    assert not child.signal_group(0)  # the group is gone too
    assert child.stop(grace=0) == -signal.SIGKILL  # stopping again is harmless


def test_child_that_drains_exits_on_sigterm(group):
    child = group.start(python("import time; print('ready', flush=True); time.sleep(600)"), name="polite")
    wait_for_line(child.log_path, "ready")
    assert child.stop(grace=DEADLINE) == -signal.SIGTERM


def test_grandchildren_die_with_the_group(group):
    # The leader exits on SIGTERM at once; its grandchild ignores SIGTERM, so only the group SIGKILL sent after
    # the leader is gone can end it.
    leader = f"""
        import subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", {IGNORES_SIGTERM!r}])
        print("grandchild", g.pid, flush=True)
        time.sleep(600)
    """
    child = group.start(python(leader), name="leader")
    grandchild = int(wait_for_line(child.log_path, "grandchild").split()[1])
    wait_until(lambda: log_text(child.log_path).count("ready") >= 1, timeout=DEADLINE, what="grandchild ready")
    assert os.getpgid(grandchild) == child.pid  # same group: the child leads it
    group.stop([child], grace=DEADLINE)
    assert child.returncode == -signal.SIGTERM
    wait_until(lambda: gone(grandchild), timeout=DEADLINE, interval=0.02, what=f"grandchild {grandchild} gone")
    assert group.children == []


def test_env_additions_and_removals(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATLOOP_TEST_DROP", "inherited")
    monkeypatch.setenv("CHATLOOP_TEST_KEEP", "inherited")
    log_path = tmp_path / "env.log"
    child = ChildProcess(
        python("import json, os; print(json.dumps(dict(os.environ)))"),
        env={"CHATLOOP_TEST_DROP": None, "CHATLOOP_TEST_NEW": "added", "CHATLOOP_TEST_ABSENT": None},
        log_path=log_path,
    ).start()
    assert child.wait(DEADLINE) == 0
    env = json.loads(log_path.read_text())
    assert "CHATLOOP_TEST_DROP" not in env
    assert env["CHATLOOP_TEST_KEEP"] == "inherited"
    assert env["CHATLOOP_TEST_NEW"] == "added"
    assert "CHATLOOP_TEST_ABSENT" not in env
    assert os.environ["CHATLOOP_TEST_DROP"] == "inherited"  # this process's environment is untouched


def test_child_env_base_is_not_modified():
    base = {"A": "1", "B": "2"}
    assert child_env({"A": None, "C": "3"}, base=base) == {"B": "2", "C": "3"}
    assert base == {"A": "1", "B": "2"}


def test_log_file_written_and_appended_on_restart(tmp_path):
    log_path = tmp_path / "out.log"
    child = ChildProcess(
        python("import sys; print('to stdout'); print('to stderr', file=sys.stderr)"), log_path=log_path, cwd=tmp_path
    )
    child.start()
    assert child.wait(DEADLINE) == 0
    first = log_path.read_text()
    assert "to stdout" in first and "to stderr" in first
    child.start()  # a restart, as ``chatloop serve`` does for a crashed stage
    assert child.wait(DEADLINE) == 0
    assert log_path.read_text().count("to stdout") == 2
    assert child.starts == 2


def test_start_twice_while_running_is_refused(group):
    child = group.start(python("import time; print('ready', flush=True); time.sleep(600)"), name="once")
    with pytest.raises(RuntimeError, match="already running"):
        child.start()


def test_stop_together_stops_every_child(group):
    children = [group.start(python(IGNORES_SIGTERM), name=f"stubborn-{i}") for i in range(3)]
    for child in children:
        wait_for_line(child.log_path, "ready")
    stop_together(children, grace=0.2)
    assert [c.returncode for c in children] == [-signal.SIGKILL] * 3
    assert not any(c.signal_group(0) for c in children)


def test_group_stop_forgets_children_and_stops_all(group):
    a = group.start(python("import time; time.sleep(600)"), name="a")
    b = group.start(python("import time; time.sleep(600)"), name="b")
    assert [c.log_path.name for c in group.children] == ["000-a.log", "001-b.log"]
    group.stop([a], grace=DEADLINE)
    assert not a.alive() and b.alive()
    assert group.children == [b]
    group.stop(grace=DEADLINE)
    assert not b.alive() and group.children == []


def test_die_with_parent(tmp_path):
    # A middle process starts a child that must die with it; the middle process is then SIGKILLed, so it
    # cannot stop anything itself: only the kernel's parent-death signal can end the child.
    middle = f"""
        import sys, time
        sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parent.parent)!r})
        from chatloop.launcher import ChildProcess
        c = ChildProcess([sys.executable, "-c", "import time; time.sleep(600)"], die_with_parent=True).start()
        print("child", c.pid, flush=True)
        time.sleep(600)
    """
    parent = ChildProcess(python(middle), log_path=tmp_path / "middle.log").start()
    try:
        pid = int(wait_for_line(tmp_path / "middle.log", "child").split()[1])
        assert not gone(pid)
        os.kill(parent.pid, signal.SIGKILL)
        assert parent.wait(DEADLINE) == -signal.SIGKILL
        wait_until(lambda: gone(pid), timeout=DEADLINE, interval=0.02, what=f"child {pid} gone after its parent")
    finally:
        parent.stop(grace=0)


def test_a_child_runs_at_the_niceness_asked_for():
    import psutil

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    before = os.nice(0)
    child = ChildProcess(sleeper, nice=5, die_with_parent=True).start()  # both steps before exec
    plain = ChildProcess(sleeper).start()
    try:
        assert psutil.Process(child.pid).nice() == before + 5
        assert psutil.Process(plain.pid).nice() == before
    finally:
        child.stop(grace=0)
        plain.stop(grace=0)


def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):
        ChildProcess([])
    with pytest.raises(ValueError, match="non-empty list"):
        ChildProcess("echo hello")
    with pytest.raises(TypeError, match="command argument 3"):
        ChildProcess(["echo", 3])
    with pytest.raises(TypeError, match="CHATLOOP_X: value must be a string or None, got int"):
        ChildProcess(["true"], env={"CHATLOOP_X": 1})
    with pytest.raises(ValueError, match="environment variable name"):
        ChildProcess(["true"], env={"A=B": "1"})
    missing = tmp_path / "no-such-program"
    with pytest.raises(FileNotFoundError, match="cannot start no-such-program"):
        ChildProcess([missing]).start()


def test_unstarted_child_is_harmless():
    child = ChildProcess(["true"])
    assert not child.alive() and child.pid is None and child.poll() is None
    assert child.stop() is None
    stop_together([child])


def test_harness_processes_keep_their_api(tmp_path):
    procs = Processes(tmp_path)
    proc = procs.start(python(IGNORES_SIGTERM), name="harness", env={"CHATLOOP_TEST_NEW": "1"})
    assert isinstance(proc, subprocess.Popen)
    wait_until(lambda: "ready" in log_tail(proc), timeout=DEADLINE, what="harness child ready")
    assert proc.log_path.name == "000-harness.log"
    other = procs.start(python("import time; time.sleep(600)"), name="other")
    assert procs.procs == [proc, other]
    procs.stop(proc, grace=0.2)
    assert proc.returncode == -signal.SIGKILL
    procs.stop(proc)  # again: nothing to do
    procs.stop_all()
    assert other.poll() is not None and procs.procs == []


def test_free_port_never_gives_the_same_port_twice(monkeypatch):
    """The kernel may hand out a port that was just closed again: two children given ports by two calls would then
    fight over one (seen in a test cluster). free_port skips ports it gave before."""
    from chatloop import http_util

    ports = iter([40001, 40001, 40001, 40002])

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            self.port = next(ports)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(http_util, "_handed_out", set())
    monkeypatch.setattr(http_util.socket, "socket", FakeSocket)
    assert [http_util.free_port(), http_util.free_port()] == [40001, 40002]
