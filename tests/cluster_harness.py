"""Real stage and coordinator processes on loopback for tests: start, wait until ready, stop everything."""

from __future__ import annotations

import json
import logging
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request

import yaml

from chatloop.http_util import free_port, wait_http_ok
from chatloop.launcher import ChildProcess, ProcessGroup
from chatloop.modelfiles.manifest import load_manifest
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


class Processes:
    """Starts child processes in their own process groups and kills every one of them at teardown.

    A thin layer over ``chatloop.launcher.ProcessGroup`` that hands tests the ``subprocess.Popen`` (with a
    ``log_path`` attribute) they poll, signal and wait on."""

    def __init__(self, logdir: pathlib.Path) -> None:
        self.logdir = logdir
        self.group = ProcessGroup(logdir)
        self._children: dict[int, ChildProcess] = {}  # id(popen) -> its launcher

    @property
    def procs(self) -> list[subprocess.Popen]:
        return [child.popen for child in self.group.children]

    def start(
        self,
        cmd: list[str],
        *,
        env: dict[str, str | None] | None = None,
        cwd: str | pathlib.Path = ROOT,
        name: str | None = None,
    ) -> subprocess.Popen:
        """Start ``cmd`` with stdout and stderr into a log file (``proc.log_path``); ``env`` adds variables
        (a None value removes one)."""
        child = self.group.start(cmd, env={"PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd, name=name)
        proc = child.popen
        proc.log_path = child.log_path  # type: ignore[attr-defined]
        self._children[id(proc)] = child
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever of it is left after ``grace`` seconds, and wait
        until the whole group is gone."""
        child = self._children.pop(id(proc), None)
        if child is None:  # stopped before, or not started here
            return
        self.group.stop([child], grace=grace)

    def stop_all(self, grace: float = 2.0) -> None:
        """SIGTERM every group at once (they drain in parallel), then SIGKILL what is left after ``grace``."""
        self._children.clear()
        self.group.stop(grace=grace)


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
                    # Test hosts in network namespaces listen on private addresses without a cluster token.
                    **({} if host.startswith("127.") else {"allow_insecure": True}),
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

    def stage_headers(self) -> dict[str, str]:
        """The cluster token for calls to the stages, when they require one."""
        token = self.stage_extra.get("security", {}).get("cluster_token")
        return {"X-ChatLoop-Token": token} if token else {}

    def stage_live_sequences(self) -> list[int]:
        """Sequences holding KV at every replica (running ones and prefix cache entries), in stage order."""
        out = []
        for urls in self.stage_urls:
            for url in urls:
                status, info = http_json(f"{url}/v1/info", headers=self.stage_headers())
                out.append(info["live_sequences"] if status == 200 else -1)
        return out

    def live_sequences(self) -> list[int]:
        """Sequences at every replica that the coordinator's prefix cache does not account for: running ones, or
        leaked ones. A test that expects everything released expects zeros here."""
        cached: dict[str, int] = {}
        if self.coordinator is not None:
            status, view = http_json(f"{self.url}/v1/cluster", timeout=5)
            if status == 200:
                cached = {r["url"]: r.get("cached_sequences", 0) for r in view["replicas"]}
        live = self.stage_live_sequences()
        urls = [u for urls in self.stage_urls for u in urls]
        return [n - cached.get(u, 0) if n >= 0 else n for n, u in zip(live, urls)]
