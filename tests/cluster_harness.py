"""Real stage and coordinator processes on loopback for tests: start, wait until ready, stop everything."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import yaml

from chatloop.http_util import free_port, wait_http_ok
from converters.manifest import load_manifest
from tests.waiting import wait_until  # noqa: F401 - the one polling helper, also offered from here

ROOT = pathlib.Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


def http_json(url: str, body: dict | None = None, timeout: float = 60.0, headers: dict | None = None):
    """(status, parsed JSON or raw text) of a GET (body None) or POST."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        status = exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class Processes:
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
        # follows never sees a port or a file still held by a dying grandchild. The deadline is generous (a
        # loaded machine is slow to tear down big processes) and costs nothing when the group goes at once.
        try:
            wait_until(
                lambda: not _group_alive(proc.pid), timeout=30, interval=0.02, what=f"process group {proc.pid} gone"
            )
        except TimeoutError:
            log.warning("process group %s still alive 30 s after SIGKILL", proc.pid)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self, grace: float = 2.0) -> None:
        """SIGTERM every group at once (they drain in parallel), then ``stop`` each one."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in list(self.procs):
            self.stop(proc, grace=grace)


def log_tail(proc: subprocess.Popen, n: int = 40) -> str:
    """The last ``n`` lines a process started by ``Processes`` wrote."""
    try:
        lines = pathlib.Path(proc.log_path).read_text(errors="replace").splitlines()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return ""
    return "\n".join(lines[-n:])


def chatloop_cmd(*args: str) -> list[str]:
    """The command line of ``chatloop ARGS`` run with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "chatloop.cli", *args]


def in_netns(netns: str | None, cmd: list[str]) -> list[str]:
    """``cmd`` run inside network namespace ``netns`` (None: as is)."""
    return ["ip", "netns", "exec", netns, *cmd] if netns else cmd


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait for a ChatLoop process's ``/readyz``; a failure shows the end of its log."""
    wait_http_ok(f"{url}/readyz", proc, timeout, detail=lambda: log_tail(proc))


class Cluster:
    """Stage replicas plus a coordinator of one converted model."""

    def __init__(
        self,
        procs: Processes,
        model_dir: pathlib.Path,
        tmp: pathlib.Path,
        replicas: int = 1,
        threads: int = 1,
        host: str = "127.0.0.1",
        stage_extra: dict | None = None,
        coordinator_extra: dict | None = None,
    ) -> None:
        self.procs = procs
        self.model_dir = pathlib.Path(model_dir)
        self.tmp = tmp
        self.manifest = load_manifest(self.model_dir)
        self.threads = threads
        self.host = host
        self.stage_extra = stage_extra or {}
        self.coordinator_extra = coordinator_extra or {}
        self.stage_urls: list[list[str]] = []
        self.stage_procs: dict[str, subprocess.Popen] = {}
        self.stage_cfgs: dict[str, pathlib.Path] = {}
        for s in self.manifest.stages:
            urls = []
            for r in range(replicas):
                port = free_port()
                url = f"http://{host}:{port}"
                cfg = {
                    "weights_path": str(self.model_dir / s.file),
                    "layer_group": s.index,
                    "host": host,
                    "port": port,
                    "worker_id": f"stage-{s.index}-r{r}",
                    "performance": {"n_threads": threads, "kv_cache_mb": 256},
                    "observability": {"log_level": "INFO"},
                    **self.stage_extra,
                }
                path = tmp / f"stage-{s.index}-r{r}-{port}.yaml"
                path.write_text(yaml.safe_dump(cfg))
                self.stage_cfgs[url] = path
                urls.append(url)
            self.stage_urls.append(urls)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.coordinator: subprocess.Popen | None = None

    def start_stage(self, url: str, wait: bool = True, netns: str | None = None) -> subprocess.Popen:
        proc = self.procs.start(
            in_netns(netns, chatloop_cmd("stage", "--config", str(self.stage_cfgs[url]))), name="stage"
        )
        self.stage_procs[url] = proc
        if wait:
            wait_ready(url, proc)
        return proc

    def start_stages(self) -> None:
        for urls in self.stage_urls:
            for url in urls:
                self.start_stage(url, wait=False)
        for url, proc in self.stage_procs.items():
            wait_ready(url, proc)

    def start_coordinator(self, wait: bool = True, **extra) -> subprocess.Popen:
        cfg = {
            "stages": self.stage_urls,
            "model_dir": str(self.model_dir),
            "host": "127.0.0.1",
            "port": self.port,
            "health_check_interval_secs": 0.5,
            "failure_threshold": 2,
            "recovery_threshold": 1,
            "connect_timeout_secs": 1.0,
            # NOTE: the product's default; a big prefill on a busy machine can take seconds, and a step
            # timeout counts as a replica failure. Tests of hung replicas set a short one themselves.
            "step_timeout_secs": 30.0,
            **self.coordinator_extra,
            **extra,
        }
        path = self.tmp / f"coordinator-{self.port}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.coordinator = self.procs.start(chatloop_cmd("coordinator", "--config", str(path)), name="coordinator")
        if wait:
            wait_ready(self.url, self.coordinator)
        return self.coordinator

    def start(self) -> Cluster:
        self.start_stages()
        self.start_coordinator()
        return self

    def live_sequences(self) -> list[int]:
        out = []
        for urls in self.stage_urls:
            for url in urls:
                status, info = http_json(f"{url}/v1/info")
                out.append(info["live_sequences"] if status == 200 else -1)
        return out
