"""Start-up of one stage: check the stage file against its manifest, pin CPUs, load the runtime, serve."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pathlib
import time

from chatloop.config import StageConfig, parse_cpu_list
from chatloop.engine import native
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime
from chatloop.http_util import run_app
from chatloop.modelfiles.gguf_info import GGUFError, read_gguf_info
from chatloop.modelfiles.manifest import ManifestError, load_manifest, sha256_file
from chatloop.stage.app import StageState, create_app
from chatloop.stage.batcher import Batcher
from chatloop.stage.metrics import StageMetrics

log = logging.getLogger(__name__)


class StageStartError(RuntimeError):
    pass


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
        # NOTE: sequences that hold KV without stepping (prefix-cache entries) are not waited for: a stopped
        # coordinator never releases them, and the stage would sit out the whole grace period.
        while time.monotonic() < deadline and state.batcher.serving():
            await asyncio.sleep(0.1)
        if state.batcher.serving():
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
