"""Child processes that take everything they started with them when stopped.

One launcher for ``chatloop serve``, the test harness and the benchmarks. Each child runs in a new session,
so it leads its own process group: SIGTERM and SIGKILL go to the whole group and also reach the
grandchildren it started (``chatloop serve`` starts stages; ``ip netns exec`` starts the real command).
Stopping is SIGTERM to the group, a grace period to drain, SIGKILL to whatever of the group is left, then a
wait until the group is gone, so whatever runs next never meets a port or a file still held by a dying
process. ``stop_together`` sends SIGTERM to many children first, so they drain in parallel.

Stdlib only: the test harness and the benchmarks import it without loading llama.cpp.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
GROUP_GONE_TIMEOUT = 30.0  # seconds to wait for orphaned group members to be reaped after SIGKILL (a busy machine)
KILL_WAIT_TIMEOUT = 10.0  # seconds to wait for the leader after SIGKILL before giving up with a warning

EnvAdditions = Mapping[str, str | None]  # a None value removes an inherited variable


def child_env(additions: EnvAdditions | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``additions``; a value of None removes a variable."""
    env = dict(os.environ if base is None else base)
    for key, value in (additions or {}).items():
        if not isinstance(key, str) or not key or "=" in key:
            raise ValueError(f"environment variable name must be a non-empty string without '=', got {key!r}")
        if value is None:
            env.pop(key, None)
        elif isinstance(value, str):
            env[key] = value
        else:
            raise TypeError(f"environment variable {key}: value must be a string or None, got {type(value).__name__}")
    return env


def _command(cmd: Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(cmd, (str, bytes)) or not isinstance(cmd, Sequence) or not cmd:
        raise ValueError(f"a command must be a non-empty list of arguments, got {cmd!r}")
    out = []
    for arg in cmd:
        if not isinstance(arg, (str, os.PathLike)):
            raise TypeError(f"command argument {arg!r} of {list(cmd)!r} is a {type(arg).__name__}, not a string")
        out.append(os.fspath(arg))
    return out


@functools.cache
def _libc_prctl():
    """libc's ``prctl``, looked up in the parent: the child between fork and exec should only call it."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: children then simply do not die with their parent
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _die_with_parent(parent_pid: int, prctl):
    """A ``preexec_fn`` that makes the kernel send SIGTERM to the child when its parent dies, even by SIGKILL.

    NOTE: the signal comes when the *thread* that started the child exits, so start such children from a
    thread that lives as long as the parent (the main thread)."""

    def preexec() -> None:
        if prctl is None:
            return
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        # The parent may have died between fork and prctl: no signal would ever come then.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class ChildProcess:
    """One command run in its own session; ``start`` may be called again after it exited (a restart).

    ``env`` adds variables to this process's environment (a None value removes an inherited one);
    ``log_path`` receives stdout and stderr (appended to on restarts), else they are inherited; ``nice`` is added
    to the child's niceness (a lower scheduling priority)."""

    def __init__(
        self,
        cmd: Sequence[str | os.PathLike],
        *,
        env: EnvAdditions | None = None,
        cwd: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None,
        name: str | None = None,
        die_with_parent: bool = False,
        nice: int = 0,
    ) -> None:
        self.cmd = _command(cmd)
        child_env(env)  # checked now: a bad value is the caller's error, not a failed start later
        self.extra_env = dict(env or {})
        self.cwd = cwd
        self.log_path = pathlib.Path(log_path) if log_path is not None else None
        self.name = name or pathlib.Path(self.cmd[0]).name
        self.die_with_parent = die_with_parent
        self.nice = nice
        self.popen: subprocess.Popen | None = None
        self.starts = 0

    def __repr__(self) -> str:
        return f"ChildProcess({self.name!r}, pid={self.pid}, alive={self.alive()})"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self.popen else None

    def poll(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> ChildProcess:
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        # The environment is read again at each start, so a restart sees what the parent changed meanwhile.
        env = child_env(self.extra_env)
        before_exec = [_die_with_parent(os.getpid(), _libc_prctl())] if self.die_with_parent else []
        if self.nice:
            before_exec.append(functools.partial(os.nice, self.nice))
        preexec = (lambda: [step() for step in before_exec]) if before_exec else None
        mode = "ab" if self.starts else "wb"
        out = open(self.log_path, mode) if self.log_path is not None else None
        try:
            self.popen = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except OSError as exc:
            raise OSError(exc.errno or errno.EIO, f"cannot start {self.name} ({self.cmd[0]}): {exc.strerror}") from exc
        finally:
            if out is not None:
                out.close()  # the child holds its own copy of the descriptor
        self.starts += 1
        log.debug("started %s (pid %d): %s", self.name, self.popen.pid, " ".join(self.cmd))
        return self

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the child's process group; False when there is none (not started or all gone)."""
        return self.popen is not None and _signal_group(self.popen.pid, sig)

    def terminate(self) -> None:
        """SIGTERM the process group (also when the leader exited: children it started may remain)."""
        self.signal_group(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None if still running after ``timeout`` seconds."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the group, wait up to ``grace`` s for the leader, SIGKILL the group, wait until it is gone.

        Returns the leader's exit status (None if it could not be reaped); safe to call again."""
        if self.popen is None:
            return None
        self.terminate()
        self.wait(max(0.0, grace))
        self.kill_group()
        return self.popen.returncode

    def kill_group(self) -> None:
        """SIGKILL whatever of the group is left and wait until the group is gone."""
        if self.popen is None:
            return
        self.signal_group(signal.SIGKILL)
        if self.wait(KILL_WAIT_TIMEOUT) is None:
            log.warning("%s (pid %d) did not exit after SIGKILL", self.name, self.popen.pid)
        # Orphaned grandchildren are reaped by init a moment after they die: poll until the group is empty.
        deadline = time.monotonic() + GROUP_GONE_TIMEOUT
        while self.signal_group(0):
            if time.monotonic() >= deadline:
                log.warning("process group %d of %s still exists after SIGKILL", self.popen.pid, self.name)
                break
            time.sleep(0.02)


def stop_together(children: Iterable[ChildProcess], grace: float = 5.0) -> None:
    """Stop many children: SIGTERM every group first (they drain in parallel), one shared ``grace`` deadline,
    then SIGKILL each group that is left."""
    children = list(children)
    for child in children:
        child.terminate()
    deadline = time.monotonic() + max(0.0, grace)
    for child in children:
        child.wait(max(0.0, deadline - time.monotonic()))
    for child in children:
        child.kill_group()


class ProcessGroup:
    """Tracks the children one owner started, so that all of them can be stopped at once.

    With a ``logdir`` each child's output goes to ``logdir/NNN-name.log``."""

    def __init__(self, logdir: str | os.PathLike | None = None, *, die_with_parent: bool = False) -> None:
        self.logdir = pathlib.Path(logdir) if logdir is not None else None
        self.die_with_parent = die_with_parent
        self.children: list[ChildProcess] = []
        self._count = 0

    def start(
        self,
        cmd: Sequence[str | os.PathLike],
        *,
        env: EnvAdditions | None = None,
        cwd: str | os.PathLike | None = None,
        name: str | None = None,
        die_with_parent: bool | None = None,
    ) -> ChildProcess:
        """Start ``cmd`` as a tracked child (see ``ChildProcess``)."""
        cmd = _command(cmd)
        name = name or pathlib.Path(cmd[0]).name
        log_path = self.logdir / f"{self._count:03d}-{name}.log" if self.logdir is not None else None
        child = ChildProcess(
            cmd,
            env=env,
            cwd=cwd,
            log_path=log_path,
            name=name,
            die_with_parent=self.die_with_parent if die_with_parent is None else die_with_parent,
        )
        child.start()
        self._count += 1
        self.children.append(child)
        return child

    def stop(self, children: Iterable[ChildProcess] | None = None, grace: float = 5.0) -> None:
        """Stop ``children`` (default: all) together and forget them."""
        targets = list(self.children if children is None else children)
        try:
            stop_together(targets, grace)
        finally:
            for child in targets:
                if child in self.children:
                    self.children.remove(child)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
