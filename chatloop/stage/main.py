"""``chatloop stage``: load one stage file and serve it."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import sys
import time

from chatloop.config import ConfigError, StageConfig, load_config, parse_cpu_list
from chatloop.engine import native
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime
from chatloop.http_util import run_app
from chatloop.logs import setup_logging
from chatloop.stage.app import StageState, create_app
from chatloop.stage.batcher import Batcher
from chatloop.stage.metrics import StageMetrics
from converters.gguf_info import GGUFError, read_gguf_info
from converters.manifest import ManifestError, load_manifest, sha256_file

log = logging.getLogger(__name__)


class StageStartError(RuntimeError):
    pass


def add_parser(sub):
    p = sub.add_parser("stage", help="serve one stage of a converted model")
    p.add_argument("--config", type=pathlib.Path, help="stage YAML (see configs/stage.yaml)")
    p.add_argument("--weights", dest="weights_path", help="stage GGUF file (overrides weights_path)")
    p.add_argument("--layer-group", type=int, help="stage index in the manifest")
    p.add_argument("--worker-id")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--threads", type=int, help="llama.cpp threads")
    p.add_argument("--kv-cache-mb", type=int)
    p.add_argument("--max-sequences", type=int)
    p.add_argument("--cpu-cores", help="pin to these cores, e.g. 0-3")
    p.add_argument("--cluster-token", help="shared token every stage endpoint requires")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the stage file")
    return "stage", run


def config_from_args(args) -> StageConfig:
    overrides: dict = {
        "weights_path": args.weights_path,
        "layer_group": args.layer_group,
        "worker_id": args.worker_id,
        "host": args.host,
        "port": args.port,
        "max_sequences": args.max_sequences,
    }
    if args.no_verify:
        overrides["verify_sha256"] = False
    perf: dict = {}
    for key, value in (("n_threads", args.threads), ("kv_cache_mb", args.kv_cache_mb), ("cpu_cores", args.cpu_cores)):
        if value is not None:
            perf[key] = value
    if args.cpu_cores:
        perf["enable_cpu_pinning"] = True
    if perf:
        overrides["performance"] = perf
    if args.cluster_token:
        overrides["security"] = {"cluster_token": args.cluster_token}
    return load_config(StageConfig, args.config, overrides=overrides)


def pin_cpus(cfg: StageConfig) -> list[int] | None:
    """Apply CPU pinning and NUMA settings before llama.cpp starts its threads (they inherit the mask)."""
    perf = cfg.performance
    cores = None
    if perf.numa_node is not None:
        node = pathlib.Path(f"/sys/devices/system/node/node{perf.numa_node}/cpulist")
        if not node.is_file():
            raise StageStartError(f"numa_node {perf.numa_node}: no such NUMA node on this machine")
        cores = parse_cpu_list(node.read_text().strip())
        native.numa_init("numactl")  # llama.cpp follows the affinity mask set below
    if perf.enable_cpu_pinning:
        if perf.cpu_cores:
            cores = parse_cpu_list(perf.cpu_cores)
        if not cores:
            raise StageStartError("enable_cpu_pinning needs performance.cpu_cores (or numa_node)")
    if cores:
        available = os.sched_getaffinity(0)
        missing = sorted(set(cores) - available)
        if missing:
            raise StageStartError(f"cpu_cores {perf.cpu_cores!r}: cores {missing} are not available here")
        os.sched_setaffinity(0, cores)
        log.info("pinned to cores %s", cores)
    return cores


def build_state(cfg: StageConfig) -> StageState:
    weights = pathlib.Path(cfg.weights_path)
    try:
        manifest = load_manifest(weights.parent)
    except ManifestError as exc:
        raise StageStartError(str(exc)) from None
    if cfg.layer_group is not None:
        if not 0 <= cfg.layer_group < len(manifest.stages):
            raise StageStartError(
                f"layer_group {cfg.layer_group}: the manifest has stages 0..{len(manifest.stages) - 1}"
            )
        entry = manifest.stages[cfg.layer_group]
        if entry.file != weights.name:
            raise StageStartError(f"layer_group {cfg.layer_group} is {entry.file} in the manifest, not {weights.name}")
    else:
        matches = [s for s in manifest.stages if s.file == weights.name]
        if not matches:
            raise StageStartError(f"{weights.name} is not listed in {weights.parent}/partition_metadata.json")
        entry = matches[0]
    if not weights.is_file():
        raise StageStartError(f"{weights}: no such file")
    if weights.stat().st_size != entry.size_bytes:
        raise StageStartError(
            f"{weights}: {weights.stat().st_size} bytes, the manifest says {entry.size_bytes} "
            "(truncated or replaced file)"
        )
    try:
        read_gguf_info(weights)
    except GGUFError as exc:
        raise StageStartError(str(exc)) from None
    if cfg.verify_sha256:
        t = time.perf_counter()
        digest = sha256_file(weights)
        if digest != entry.sha256:
            raise StageStartError(
                f"{weights}: sha256 {digest[:16]}... does not match the manifest's "
                f"{entry.sha256[:16]}... (corrupted or mismatched file; --no-verify skips this check)"
            )
        log.info("sha256 verified in %.2f s", time.perf_counter() - t)
    cores = pin_cpus(cfg)
    threads = cfg.performance.n_threads or (len(cores) if cores else os.cpu_count() or 1)
    options = RuntimeOptions(
        n_threads=threads,
        kv_cache_mb=cfg.performance.kv_cache_mb,
        max_sequences=cfg.max_sequences,
        n_batch=cfg.performance.n_batch,
        n_ubatch=cfg.performance.n_ubatch,
    )
    runtime = StageRuntime(weights, StageRole(first=entry.has_embedding, last=entry.has_head), options)
    worker = cfg.worker_id or f"stage-{entry.index}"
    metrics = StageMetrics(stage=str(entry.index), worker=worker)
    import dataclasses  # noqa: PLC0415

    cfg = dataclasses.replace(cfg, worker_id=worker)
    return StageState(
        cfg=cfg,
        runtime=runtime,
        entry=entry,
        manifest=manifest,
        metrics=metrics,
        batcher=Batcher(runtime, cfg.batching, metrics),
        threads=threads,
        pinned_cores=cores,
    )


async def serve_stage(state: StageState) -> None:
    app = create_app(state)

    async def drain() -> None:
        state.draining = True
        deadline = time.monotonic() + state.cfg.drain_grace_secs
        while time.monotonic() < deadline and (state.runtime.live_sequences or state.batcher.depth):
            await asyncio.sleep(0.1)
        if state.runtime.live_sequences:
            log.warning("grace period over with %d live sequences", state.runtime.live_sequences)

    e = state.entry
    await run_app(
        app,
        state.cfg.host,
        state.cfg.port,
        drain,
        ready_line=f"stage {e.index} (layers {e.layer_start}:{e.layer_end}) serving on "
        f"http://{state.cfg.host}:{state.cfg.port}",
    )


def run(args) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"chatloop stage: error: {exc}", file=sys.stderr)
        return 2
    name = cfg.worker_id or (f"stage-{cfg.layer_group}" if cfg.layer_group is not None else "stage")
    setup_logging(cfg.observability.log_level, cfg.observability.log_format, name)
    try:
        state = build_state(cfg)
    except (StageStartError, OSError, RuntimeError, ValueError) as exc:
        log.error("cannot start stage: %s", exc)
        print(f"chatloop stage: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve_stage(state))
    finally:
        state.runtime.close()
    return 0
