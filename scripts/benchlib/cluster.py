"""ChatLoop under test: every stage of a converted model plus a coordinator, on free loopback ports, with the
knobs the benchmarks compare (threads per stage, pipeline depth, batching window, OpenMP wait policy)."""

from __future__ import annotations

import os
import pathlib
import sys
from dataclasses import dataclass

import yaml

from benchlib.children import Children, wait_http
from benchlib.omp import omp_env
from chatloop.http_util import free_port
from chatloop.launcher import ChildProcess
from chatloop.modelfiles.manifest import load_manifest
from chatloop.serve import COORDINATOR_NICE


@dataclass(frozen=True)
class ChatLoopVariant:
    threads: int = 2  # llama.cpp threads per stage process
    pipeline_depth: int = 1  # coordinator batching.pipeline_depth (0 = one micro-batch per stage)
    window_ms: float = 0.0  # stage batching.batching_window_ms
    omp: str = "spin20000"  # stage processes' OpenMP wait behaviour (see omp_env)
    pin: bool = False  # pin stage K to core K modulo the cores (performance.cpu_cores)
    prefix_cache: bool = True  # coordinator prefix_cache
    prefix_exact: bool = True  # coordinator prefix_cache_exact (false: reuse every cached position)
    kv_cache_mb: int = 256  # stage performance.kv_cache_mb (split between its sequence slots)
    topology: str = "chain"  # coordinator topology: chain (stage to stage, the default) or star (via the coordinator)
    # coordinator ring_steps (chain: the last stage starts the next decode step itself); None = as `chatloop serve`
    # decides: on only when every stage is pinned to a core of its own
    ring: bool | None = None
    delay_ms: float = 0.0  # one-way delay on every link (a scripts/delay_proxy.py in front of each stage); 0 = none
    # the coordinator process's niceness (>0: it yields the cores to busy stages); None = as `chatloop serve` does:
    # COORDINATOR_NICE when the stages are pinned to cores of their own, else 0
    coordinator_nice: int | None = None
    coordinator_cores: str = ""  # pin the coordinator process to these cores (taskset -c), e.g. "1"; "" = not pinned
    event_loop: str = ""  # every process's CHATLOOP_EVENT_LOOP (uvloop or asyncio; "" = the default)
    checkout: str = ""  # run the processes from this checkout of the repository ("" = this one): before / after
    # stage batching.prompt_part_rows > 0: prompt chunks passed on in parts; None = as `chatloop serve` decides (only
    # when every stage has its own cores: pinned)
    prompt_parts: bool | None = None

    def own_cores(self, n_stages: int) -> bool:
        """Every one of ``n_stages`` stages pinned to a core no other stage uses (stage K to core K)."""
        return self.pin and n_stages <= (os.cpu_count() or 1)

    def ring_steps(self, n_stages: int) -> bool:
        """Whether the coordinator takes ring steps with ``n_stages`` stages."""
        if self.topology != "chain":
            return False
        return self.own_cores(n_stages) if self.ring is None else self.ring

    @property
    def label(self) -> str:
        depth = self.pipeline_depth or "auto"
        label = f"t{self.threads} d{depth} w{self.window_ms:g} omp-{self.omp}" + (" pinned" if self.pin else "")
        label += "" if self.prefix_cache else " no-cache"
        label += "" if self.prefix_exact else " not-exact"
        label += (
            f" {self.topology}"
            + {None: "", True: " ring", False: " no-ring"}[self.ring if self.topology == "chain" else None]
        )
        label += f" coordinator-nice{self.coordinator_nice}" if self.coordinator_nice is not None else ""
        label += f" coordinator@{self.coordinator_cores}" if self.coordinator_cores else ""
        label += f" {self.event_loop}" if self.event_loop else ""
        label += f" @{self.checkout}" if self.checkout else ""
        label += {None: "", True: " parts", False: " no-parts"}[self.prompt_parts]
        return label + (f" +{self.delay_ms:g}ms/link" if self.delay_ms else "")


class ChatLoopCluster:
    """Every stage of ``model_dir`` as its own process plus a coordinator, on free loopback ports."""

    def __init__(self, children: Children, model_dir: pathlib.Path, variant: ChatLoopVariant, workdir: pathlib.Path):
        self.children = children
        self.model_dir = pathlib.Path(model_dir)
        self.variant = variant
        self.workdir = workdir
        self.manifest = load_manifest(self.model_dir)
        self.procs: list[ChildProcess] = []  # stages, then the coordinator
        self.proxies: list[ChildProcess] = []  # delay proxies (variant.delay_ms)
        self.stage_urls: list[str] = []
        self.url = ""

    def start(self) -> ChatLoopCluster:
        v = self.variant
        env = omp_env(v.omp) | self.loop_env
        stage_procs = []
        for s in self.manifest.stages:
            port = free_port()
            cfg = {
                "weights_path": str(self.model_dir / s.file),
                "layer_group": s.index,
                "host": "127.0.0.1",
                "port": port,
                "verify_sha256": False,  # start fast; the files are the cached demo conversion
                "batching": {"batching_window_ms": v.window_ms} | self._part_rows(),
                "performance": {"n_threads": v.threads, "kv_cache_mb": v.kv_cache_mb}
                | ({"enable_cpu_pinning": True, "cpu_cores": str(s.index % os.cpu_count())} if v.pin else {}),
                "observability": {"log_level": "WARNING"},
            }
            path = self.workdir / f"stage-{s.index}-{port}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            cmd = [sys.executable, "-m", "chatloop.cli", "stage", "--config", str(path)]
            stage_procs.append(self.children.start(f"stage-{s.index}", cmd, env, self.cwd))
            self.stage_urls.append(f"http://127.0.0.1:{port}")
        self.procs.extend(stage_procs)
        for url, proc in zip(self.stage_urls, stage_procs):
            wait_http(f"{url}/readyz", proc)
        routed = self.stage_urls
        if v.delay_ms:
            # Every link goes through a proxy in front of its stage: coordinator -> stage K in the star, and in the
            # chain also stage K-1 -> stage K (the coordinator registers these URLs as the stages' peers).
            routed = [self._delay_proxy(url, v.delay_ms) for url in self.stage_urls]
        port = free_port()
        cfg = {
            "stages": [[u] for u in routed],
            "topology": v.topology,
            "model_dir": str(self.model_dir),
            "host": "127.0.0.1",
            "port": port,
            "batching": {"pipeline_depth": v.pipeline_depth, "max_batch_size": 16},
            "prefix_cache": v.prefix_cache,
            "prefix_cache_exact": v.prefix_exact,
            "observability": {"log_level": "WARNING"},
        }
        cfg |= self._ring_steps()
        path = self.workdir / f"coordinator-{port}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "chatloop.cli", "coordinator", "--config", str(path)]
        own_cores = v.own_cores(len(self.manifest.stages))
        nice = (COORDINATOR_NICE if own_cores else 0) if v.coordinator_nice is None else v.coordinator_nice
        if nice:
            cmd = ["nice", "-n", str(nice), *cmd]
        if v.coordinator_cores:
            cmd = ["taskset", "-c", v.coordinator_cores, *cmd]
        proc = self.children.start("coordinator", cmd, self.loop_env, self.cwd)
        self.procs.append(proc)
        self.url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.url}/readyz", proc)
        return self

    def _ring_steps(self) -> dict:
        """The coordinator's ``ring_steps`` when it is not its default (true): false when ring steps are off. Not
        written for a checkout whose code predates the key."""
        ring = self.variant.ring_steps(len(self.manifest.stages))
        config = (self.cwd or pathlib.Path(__file__).resolve().parents[2]) / "chatloop" / "config.py"
        return {} if ring or "ring_steps" not in config.read_text() else {"ring_steps": False}

    def _part_rows(self) -> dict:
        """The stages' ``prompt_part_rows`` when it is not their default (64): 0 when parts are off. Not written for
        a checkout whose code predates the key."""
        parts = self.variant.pin if self.variant.prompt_parts is None else self.variant.prompt_parts
        config = (self.cwd or pathlib.Path(__file__).resolve().parents[2]) / "chatloop" / "config.py"
        return {} if parts or "prompt_part_rows" not in config.read_text() else {"prompt_part_rows": 0}

    @property
    def cwd(self) -> pathlib.Path | None:
        return pathlib.Path(self.variant.checkout) if self.variant.checkout else None

    @property
    def loop_env(self) -> dict[str, str | None]:
        return {"CHATLOOP_EVENT_LOOP": self.variant.event_loop or None}

    def _delay_proxy(self, url: str, delay_ms: float) -> str:
        port = free_port()
        script = pathlib.Path(__file__).resolve().parent.parent / "delay_proxy.py"
        target = url.split("://", 1)[1]
        cmd = [sys.executable, str(script), "--listen", str(port), "--target", target, "--delay-ms", f"{delay_ms:g}"]
        proc = self.children.start(f"delay-proxy-{port}", cmd)
        self.proxies.append(proc)
        proxied = f"http://127.0.0.1:{port}"
        wait_http(f"{proxied}/readyz", proc)
        return proxied

    @property
    def pids(self) -> dict[str, int]:
        names = [f"stage-{i}" for i in range(len(self.stage_urls))] + ["coordinator"]
        return {n: p.pid for n, p in zip(names, self.procs)}

    def stop(self) -> None:
        self.children.stop(self.procs + self.proxies)
        self.procs.clear()
        self.proxies.clear()


def variant_from_args(args) -> ChatLoopVariant:
    return ChatLoopVariant(
        threads=args.stage_threads,
        pipeline_depth=args.pipeline_depth,
        window_ms=args.window_ms,
        omp=args.omp,
        topology=args.topology,
        ring={"on": True, "off": False, "serve": None}[args.ring],
    )


def add_variant_args(p, best: ChatLoopVariant) -> None:
    """Flags selecting the ChatLoop configuration (defaults: the fastest found on this 2-core machine)."""
    p.add_argument("--stage-threads", type=int, default=best.threads,
                   help=f"llama.cpp threads per stage (default {best.threads})")  # fmt: skip
    p.add_argument("--pipeline-depth", type=int, default=best.pipeline_depth,
                   help=f"coordinator batching.pipeline_depth, 0 = one per stage (default {best.pipeline_depth})")  # fmt: skip
    p.add_argument("--window-ms", type=float, default=best.window_ms,
                   help=f"stage batching.batching_window_ms (default {best.window_ms:g})")  # fmt: skip
    p.add_argument("--omp", default=best.omp,
                   help=f"stage processes' OpenMP waiting: default, passive or spin<N> (default {best.omp})")  # fmt: skip
    p.add_argument("--topology", choices=["star", "chain"], default=best.topology,
                   help=f"coordinator topology: star or chain (default {best.topology})")  # fmt: skip
    p.add_argument("--ring", choices=["on", "off", "serve"], default="serve",
                   help="chain: coordinator ring_steps; serve: as `chatloop serve` decides, on only when every stage "
                        "is pinned to a core of its own (default serve)")  # fmt: skip


def parse_checkouts(text: str) -> list[str]:
    """``--checkouts``: comma-separated checkouts of this repository ('' or . = this one) as absolute paths ('' for
    this one); a ValueError names an entry that is not a checkout."""
    out = []
    for c in (x.strip() for x in text.split(",")):
        if c in ("", "."):
            out.append("")
            continue
        path = pathlib.Path(c).resolve()
        if not (path / "chatloop" / "cli.py").is_file():
            raise ValueError(f"--checkouts: {c} is not a checkout of this repository (no chatloop/cli.py)")
        out.append(str(path))
    return out
