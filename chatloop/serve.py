"""``chatloop serve``: every stage of a converted model and the coordinator as processes on this machine.

Starts the stages (on free loopback ports), waits until each is ready, starts the coordinator, prints
its URL and supervises: a stage that crashes is restarted with backoff on the same port, so it rejoins
the coordinator's routing. Ctrl-C or SIGTERM stops everything (SIGTERM first: each drains; then SIGKILL).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import yaml

from chatloop.bind_policy import insecure_bind_error
from chatloop.config import ClusterConfig, ConfigError, load_config, parse_cpu_list
from chatloop.core_shares import auto_replica_shares, format_cores, usable_cores
from chatloop.http_util import free_port, wait_http_ok
from chatloop.launcher import ChildProcess, stop_together
from chatloop.modelfiles.manifest import ManifestError, load_manifest

log = logging.getLogger(__name__)

COORDINATOR_NICE = 10  # the coordinator's niceness when every stage has its own cores (Supervisor._coordinator_nice)


def add_parser(sub):
    p = sub.add_parser("serve", help="run every stage and the coordinator of a converted model on this machine")
    p.add_argument("model_dir", nargs="?", help="converted model folder (default: the demo model, SmolLM2-135M)")
    p.add_argument("--config", type=pathlib.Path, help="cluster YAML (see configs/cluster.yaml)")
    p.add_argument("--host", help="coordinator address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="coordinator port (default 8000)")
    p.add_argument("--replicas", type=int, help="replicas of every stage")
    p.add_argument("--threads", type=int, help="llama.cpp threads per stage process")
    return "serve", run


@dataclasses.dataclass
class Child:
    """One supervised process and its restart state."""

    name: str
    cmd: list[str]
    url: str
    env: dict[str, str | None]  # added to this process's environment
    process: ChildProcess | None = None
    restarts: int = 0
    next_start: float = 0.0
    backoff: float = 1.0
    started_at: float = 0.0
    nice: int = 0  # added to the process's niceness

    def start(self) -> None:
        if self.process is None:
            # NOTE: die with the supervisor: a stage must not outlive a ``chatloop serve`` killed by SIGKILL.
            self.process = ChildProcess(self.cmd, env=self.env, name=self.name, die_with_parent=True, nice=self.nice)
        self.started_at = time.monotonic()
        self.process.start()

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.process.popen if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()


class Supervisor:
    def __init__(self, cfg: ClusterConfig, model_dir: pathlib.Path) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        self.manifest = load_manifest(model_dir)
        self.stages: list[Child] = []
        self.coordinator: Child | None = None
        self.workdir = tempfile.TemporaryDirectory(prefix="chatloop-serve-")
        self.stopping = False

    def _stage_children(self) -> list[list[Child]]:
        cfg = self.cfg
        out = []
        port = cfg.stage_base_port
        for s in self.manifest.stages:
            per = cfg.stages[s.index] if s.index < len(cfg.stages) else None
            replicas = per.replicas if per else 1
            shares = auto_replica_shares(cfg, s.index, usable_cores())
            group = []
            for r in range(replicas):
                p = port if port else free_port()
                port = port + 1 if port else 0
                perf = dataclasses.asdict(cfg.performance)
                if per and per.n_threads:
                    perf["n_threads"] = per.n_threads
                if per and per.cpu_cores:
                    perf["cpu_cores"], perf["enable_cpu_pinning"] = per.cpu_cores, True
                if shares:
                    # Replicas of a stage decode at once: each gets its own cores (chatloop/core_shares.py).
                    perf.update(cpu_cores=format_cores(shares[r]), enable_cpu_pinning=True, n_threads=len(shares[r]))
                stage_cfg = {
                    "weights_path": str(self.model_dir / s.file),
                    "worker_id": f"stage-{s.index}-r{r}",
                    "layer_group": s.index,
                    "host": "127.0.0.1",
                    "port": p,
                    "batching": self._stage_batching(),
                    "performance": perf,
                    "observability": dataclasses.asdict(cfg.observability),
                    "security": {"cluster_token": cfg.security.cluster_token},
                }
                path = pathlib.Path(self.workdir.name) / f"stage-{s.index}-r{r}.yaml"
                path.write_text(yaml.safe_dump(stage_cfg))
                cmd = [sys.executable, "-m", "chatloop.cli", "stage", "--config", str(path)]
                group.append(
                    Child(
                        f"stage-{s.index}-r{r}",
                        cmd,
                        f"http://127.0.0.1:{p}",
                        _child_env(),
                        backoff=cfg.restart_backoff_secs,
                    )
                )
            out.append(group)
        return out

    def start(self) -> str:
        groups = self._stage_children()
        self.stages = [c for g in groups for c in g]
        for child in self.stages:
            child.start()
        for child in self.stages:
            wait_http_ok(f"{child.url}/readyz", child.proc, timeout=300, interval=0.2)
            log.info("%s ready at %s", child.name, child.url)
        path = pathlib.Path(self.workdir.name) / "coordinator.yaml"
        path.write_text(yaml.safe_dump(self._coordinator_config([[c.url for c in g] for g in groups])))
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::") else self.cfg.host
        url = f"http://{host}:{self.cfg.port}"
        self.coordinator = Child(
            "coordinator",
            [sys.executable, "-m", "chatloop.cli", "coordinator", "--config", str(path)],
            url,
            _child_env(),
            nice=self._coordinator_nice(),
        )
        self.coordinator.start()
        wait_http_ok(f"{url}/readyz", self.coordinator.proc, timeout=120, interval=0.2)
        return url

    def _coordinator_config(self, stage_urls: list[list[str]]) -> dict:
        return {
            # NOTE: ring steps only when stages have their own cores (the config's own setting, below, wins). Stages
            # sharing cores otherwise move one step at a time (the coordinator sends a step once the last one is back
            # from every route); with ring steps each route goes round on its own, and routes whose stages share a
            # core then compute at once: 2 replicas per stage on 2 cores at concurrency 8, 0.85-0.89 x the tokens/s
            # of 1 replica per stage with ring steps, 0.91-1.01 x without (bench_replicas.py --topology chain /
            # chain-no-ring, scripts/README.md "Session 14").
            "ring_steps": self._stages_on_own_cores(),
            **self.cfg.coordinator,
            "batching": self._coordinator_batching(),
            "stages": stage_urls,
            "model_dir": str(self.model_dir),
            "host": self.cfg.host,
            "port": self.cfg.port,
            "allow_insecure": self.cfg.allow_insecure,
            "observability": dataclasses.asdict(self.cfg.observability),
            "security": {
                "cluster_token": self.cfg.security.cluster_token,
                "api_keys": list(self.cfg.security.api_keys),
            },
        }

    def _coordinator_batching(self) -> dict:
        batching = dict(self.cfg.coordinator.get("batching") or {})
        if "pipeline_depth" not in batching and not self._stages_on_own_cores():
            # NOTE: stages that share every core gain nothing from a second micro-batch in flight: both
            # stages then decode at once with all their threads on the same cores (bench_load.py measured
            # 0.27 x the throughput of one micro-batch at concurrency 8 on 2 cores). One micro-batch keeps
            # each decode at full speed; give stages their own cpu_cores to pipeline them.
            batching["pipeline_depth"] = 1
        return batching

    def _stage_batching(self) -> dict:
        batching = dataclasses.asdict(self.cfg.stage_defaults)
        if not self._stages_on_own_cores():
            # NOTE: as for pipeline_depth: a prompt passed on in parts keeps two stages computing at once, which
            # pays only when they do not share cores.
            batching["prompt_part_rows"] = 0
        return batching

    def _coordinator_nice(self) -> int:
        """Niceness added to the coordinator: COORDINATOR_NICE when every stage has its own cores, else 0.

        NOTE: the coordinator then has no core of its own; at nice 0 the kernel often runs its turn (text,
        stop strings, the client's stream) on a stage's core just as that stage starts its next decode. At nice
        10 the stages' decodes go first: demo model, 2 stages pinned, one stream, 0.836 x in-process against
        0.813 x (bench_serve.py --coordinator-nice 0,10, scripts/README.md "Session 15"). On shared cores it
        does not help (1B-class model, 2 threads a stage: 0.81 at nice 10 against 0.90 x), as it would not where the
        coordinator has its own machine."""
        return COORDINATOR_NICE if self._stages_on_own_cores() else 0

    def _stages_on_own_cores(self) -> bool:
        """True when every stage is pinned to cores no other stage uses."""
        per = self.cfg.stages
        if len(per) < len(self.manifest.stages) or not all(s.cpu_cores for s in per):
            return False
        seen: set[int] = set()
        for s in per[: len(self.manifest.stages)]:
            cores = set(parse_cpu_list(s.cpu_cores))
            if cores & seen:
                return False
            seen |= cores
        return True

    def watch(self) -> int:
        """Restart crashed stages until asked to stop; returns the exit code."""
        while not self.stopping:
            time.sleep(0.2)
            if self.coordinator and not self.coordinator.alive() and not self.stopping:
                log.error("the coordinator exited with %s", self.coordinator.proc.returncode)
                return 1
            now = time.monotonic()
            for child in self.stages:
                if child.alive() or self.stopping:
                    continue
                if child.next_start == 0.0:
                    child.next_start = now + child.backoff
                    log.warning(
                        "%s exited with %s; restarting in %.1f s", child.name, child.proc.returncode, child.backoff
                    )
                    child.backoff = min(child.backoff * 2, 30.0)
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start()
                    log.info("%s restarted (restart %d)", child.name, child.restarts)
            for child in self.stages:
                if child.alive() and now - child.started_at > 60:
                    child.backoff = self.cfg.restart_backoff_secs  # a quiet minute: the backoff starts over
        return 0

    def stop(self, grace: float = 15.0) -> None:
        self.stopping = True
        children = ([self.coordinator] if self.coordinator else []) + self.stages
        stop_together([c.process for c in children if c.process is not None], grace)
        self.workdir.cleanup()


def _child_env() -> dict[str, str]:
    """Variables added to the children's environment where this process does not set them."""
    defaults = {
        "PYTHONUNBUFFERED": "1",
        # llama.cpp's OpenMP threads spin after each decode by default and steal the core the next stage
        # needs; a short spin keeps barriers fast and lets them sleep between decodes (scripts/README.md).
        "GOMP_SPINCOUNT": "20000",
    }
    return {k: v for k, v in defaults.items() if k not in os.environ}


def run(args) -> int:
    overrides: dict = {"host": args.host, "port": args.port}
    try:
        cfg = load_config(ClusterConfig, args.config, overrides=overrides)
        if args.replicas or args.threads:
            base = list(cfg.stages) or []
            n = len(load_manifest(args.model_dir).stages) if args.model_dir else 2
            from chatloop.config import ClusterStage  # noqa: PLC0415

            stages = [base[i] if i < len(base) else ClusterStage() for i in range(n)]
            stages = [
                dataclasses.replace(s, replicas=args.replicas or s.replicas, n_threads=args.threads or s.n_threads)
                for s in stages
            ]
            cfg = dataclasses.replace(cfg, stages=tuple(stages))
    except (ConfigError, ManifestError) as exc:
        print(f"chatloop serve: error: {exc}", file=sys.stderr)
        return 2
    from chatloop.logs import setup_logging  # noqa: PLC0415

    setup_logging(cfg.observability.log_level, cfg.observability.log_format, "serve")
    refusal = insecure_bind_error("coordinator", cfg.host, cfg.security.cluster_token, cfg.allow_insecure)
    if refusal:
        print(f"chatloop serve: error: {refusal}", file=sys.stderr)
        return 2
    model_dir = args.model_dir or cfg.model_dir
    try:
        if model_dir is None:
            from chatloop.demo import demo_model_dir  # noqa: PLC0415

            print("chatloop serve: using the demo model SmolLM2-135M-Instruct (2 stages)", file=sys.stderr)
            model_dir = demo_model_dir(2)
        sup = Supervisor(cfg, pathlib.Path(model_dir))
    except (ManifestError, OSError, subprocess.CalledProcessError) as exc:
        print(f"chatloop serve: error: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum, frame):
        sup.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        url = sup.start()
    except (RuntimeError, TimeoutError) as exc:
        print(f"chatloop serve: error: {exc}", file=sys.stderr)
        sup.stop()
        return 1
    stages = ", ".join(f"{c.name} {c.url}" for c in sup.stages)
    log.info("stages: %s", stages)
    print(
        f"ChatLoop is serving {sup.manifest.model} at {url}  (chat: {url}/  cluster: {url}/cluster  OpenAI API: {url}/v1)",
        flush=True,
    )
    if not sys.stdout.isatty():
        # For scripts and supervisors reading our stdout: the same as one JSON line.
        print(json.dumps({"event": "ready", "url": url, "stages": [c.url for c in sup.stages]}), flush=True)
    try:
        code = sup.watch()
    finally:
        sup.stop()
    return code
