"""The stage's HTTP API: ``POST /v1/forward`` (binary frames), release, health, readiness, metrics, info."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import time
from dataclasses import dataclass, field

import numpy as np
import psutil
from aiohttp import web

from chatloop import __version__
from chatloop.config import StageConfig
from chatloop.engine import native
from chatloop.engine.errors import CapacityError, InvalidStepError, KVMissingError, StepRefused
from chatloop.engine.runtime import StageRuntime
from chatloop.http_util import bearer, context_middleware, error_response, secret_equals, token_middleware
from chatloop.metrics_util import metrics_response
from chatloop.modelfiles.manifest import Manifest, StageEntry
from chatloop.protocol.frames import CONTENT_TYPE, FrameError
from chatloop.protocol.messages import (
    ERROR_STATUS,
    ErrorCode,
    decode_forward,
    encode_hidden,
    encode_tokens,
    parse_release,
)
from chatloop.protocol.streams import STREAM_PATH
from chatloop.stage.batcher import Batcher, CancelledStepError, QueueFullError
from chatloop.stage.chain import add_chain_routes
from chatloop.stage.metrics import StageMetrics
from chatloop.stage.vocab import vocab_only_gguf

log = logging.getLogger(__name__)


@dataclass
class StageState:
    cfg: StageConfig
    runtime: StageRuntime
    entry: StageEntry
    manifest: Manifest
    metrics: StageMetrics
    batcher: Batcher
    threads: int
    pinned_cores: list[int] | None
    draining: bool = False
    started: float = field(default_factory=time.time)
    vocab_cache: bytes | None = None


STATE = web.AppKey("stage_state", StageState)
# Optional step fields this stage understands; a coordinator sends them only to routes whose every replica does
# (a stage of an older version refuses an unknown field as a bad frame).
STEP_FEATURES = ("draft",)


def _state(request: web.Request) -> StageState:
    return request.app[STATE]


# A forward call the stage refuses: the first matching class gives the code (order matters: subclasses first).
_REFUSAL_CODES: dict[type[Exception], ErrorCode] = {
    QueueFullError: ErrorCode.QUEUE_FULL,
    CancelledStepError: ErrorCode.CANCELLED,
    KVMissingError: ErrorCode.KV_MISSING,
    CapacityError: ErrorCode.CAPACITY,
    InvalidStepError: ErrorCode.BAD_REQUEST,
}
_REFUSALS = (*_REFUSAL_CODES, StepRefused)


def refusal_code(exc: BaseException) -> ErrorCode:
    """The ErrorCode of an exception out of ``Batcher.submit``: a refusal's, else a fault of this stage."""
    if isinstance(exc, _REFUSALS):
        return next((c for k, c in _REFUSAL_CODES.items() if isinstance(exc, k)), ErrorCode.BAD_REQUEST)
    return ErrorCode.DECODE_FAILED


def _refusal(st: StageState, code: ErrorCode, message: str) -> web.Response:
    st.metrics.count(code.value)
    status = ERROR_STATUS[code]
    err_type = {
        400: "invalid_request_error",
        401: "authentication_error",
        409: "conflict",
        422: "invalid_request_error",
    }
    return error_response(
        status,
        message,
        err_type.get(status, "unavailable" if status == 503 else "server_error"),
        code.value,
        headers={"Retry-After": "1"} if status == 503 else None,
    )


async def forward(request: web.Request) -> web.Response:
    st = _state(request)
    rt = st.runtime
    try:
        body = await request.read()
        req = decode_forward(
            body,
            first=rt.role.first,
            n_embd=rt.n_embd,
            max_bytes=st.cfg.frame_max_bytes,
            max_steps=st.cfg.max_sequences,
        )
    except FrameError as exc:
        return _refusal(st, ErrorCode.BAD_FRAME, f"stage {st.entry.index}: {exc}")
    if st.draining and any(s.seq_id not in rt.live_ids() for s in req.steps):
        return _refusal(st, ErrorCode.DRAINING, "stage is draining: no new sequences")
    try:
        result = await st.batcher.submit(req.steps, req.data)
    except _REFUSALS as exc:
        code = next((c for k, c in _REFUSAL_CODES.items() if isinstance(exc, k)), ErrorCode.BAD_REQUEST)
        return _refusal(st, code, str(exc))
    except Exception as exc:  # noqa: BLE001 - a fault of this stage (llama.cpp or a bug), never the caller's
        log.error("forward failed: %s: %s", type(exc).__name__, exc)
        return _refusal(st, ErrorCode.DECODE_FAILED, f"decode failed: {type(exc).__name__}: {exc}")
    st.metrics.count("ok")
    _refresh_gauges(st)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("forward of %d steps (traces %s)", len(req.steps), request.headers.get("X-ChatLoop-Traces", "-"))
    frame = encode_hidden(result, req.want) if isinstance(result, np.ndarray) else encode_tokens(result)
    return web.Response(body=frame, content_type=CONTENT_TYPE)


async def release(request: web.Request) -> web.Response:
    st = _state(request)
    try:
        seqs = parse_release(await request.json())
    except ValueError as exc:
        return error_response(400, f"bad release request: {exc}", code=ErrorCode.BAD_REQUEST.value)
    wanted = set(seqs)
    cancelled = st.batcher.cancel(wanted)
    freed = 0
    for seq in wanted:
        freed += await st.runtime.call(st.runtime.release, seq)
    _refresh_gauges(st)
    return web.json_response({"released": freed, "cancelled": cancelled})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    st = _state(request)
    if st.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    st = _state(request)
    _refresh_gauges(st)
    st.metrics.process.refresh()
    return metrics_response(st.metrics.registry)


def info_dict(st: StageState) -> dict:
    rt, e, m = st.runtime, st.entry, st.manifest
    return {
        "worker_id": st.cfg.worker_id,
        "chatloop_version": __version__,
        "features": list(STEP_FEATURES),
        "model": m.model,
        "arch": m.arch,
        "quant": m.quant,
        "stage_index": e.index,
        "stage_count": len(m.stages),
        "layer_start": e.layer_start,
        "layer_end": e.layer_end,
        "n_layer_total": m.n_layer,
        "n_embd": rt.n_embd,
        "n_vocab": m.n_vocab,
        "has_embedding": e.has_embedding,
        "has_head": e.has_head,
        "has_vocab": e.has_vocab,
        "file": e.file,
        "sha256": e.sha256,
        "n_ctx": rt.n_ctx,
        "n_ctx_seq": rt.n_ctx_seq,
        "n_ctx_train": rt.model.n_ctx_train,
        "max_sequences": rt.options.max_sequences,
        "n_batch": rt.options.n_batch,
        "live_sequences": rt.live_sequences,
        "kv_tokens_used": rt.kv_tokens_used,
        # For the coordinator's cluster page: memory, and busy share as the change of decode time between probes.
        "file_bytes": e.size_bytes,
        "rss_bytes": psutil.Process().memory_info().rss,
        "decode_seconds": st.metrics.registry.get_sample_value(
            "worker_forward_duration_seconds_sum", st.metrics.labels
        ),
        "queue_depth": st.batcher.depth,
        "decode_count": rt.decode_count,
        "ubatch_count": rt.stats.ubatch_count,
        "slot_moves": rt.stats.moves,  # idle sequences moved out of a micro-batch's slots (engine/slots.py)
        "threads": st.threads,
        "pinned_cores": st.pinned_cores,
        "pid": os.getpid(),
        "draining": st.draining,
        "uptime_secs": round(time.time() - st.started, 1),
        "started": st.started,  # with pid: a coordinator notices a restart (the replica lost its sequences)
        "system_info": native.system_info(),
        "simd": native.simd_features(),
    }


async def info(request: web.Request) -> web.Response:
    return web.json_response(info_dict(_state(request)))


async def vocab(request: web.Request) -> web.Response:
    """The stage file's metadata and vocabulary as a tensor-free GGUF, for a coordinator without the model."""
    st = _state(request)
    if not st.entry.has_vocab:
        return error_response(404, f"stage {st.entry.index} carries no vocabulary", code="no_vocab")
    if st.vocab_cache is None:
        path = pathlib.Path(st.runtime.path)
        st.vocab_cache = await asyncio.get_running_loop().run_in_executor(None, vocab_only_gguf, path)
    return web.Response(body=st.vocab_cache, content_type="application/octet-stream")


def _refresh_gauges(st: StageState) -> None:
    st.metrics.live_sequences.set(st.runtime.live_sequences)
    st.metrics.kv_used.set(st.runtime.kv_tokens_used)


async def _reap_idle(app: web.Application) -> None:
    """Free sequences nobody has stepped for a long time (their coordinator went away)."""
    st = app[STATE]
    timeout = st.cfg.idle_sequence_timeout_secs
    while True:
        await asyncio.sleep(min(30.0, timeout / 2))
        idle = await st.runtime.call(st.runtime.release_idle, timeout)
        if idle:
            log.warning("freed %d idle sequences", len(idle))
            _refresh_gauges(st)


def create_app(state: StageState) -> web.Application:
    middlewares = [context_middleware()]
    token = state.cfg.security.cluster_token
    if token:
        middlewares.append(
            token_middleware(
                # NOTE: "Authorization: Bearer" too, so that Prometheus can scrape /metrics with the token.
                lambda r: secret_equals(r.headers.get("X-ChatLoop-Token"), token) or secret_equals(bearer(r), token),
                # NOTE: streams check the token themselves, to log whom they refuse (stage/chain.py).
                ("/healthz", "/readyz", STREAM_PATH),
                "missing or wrong cluster token (X-ChatLoop-Token or Authorization: Bearer)",
            )
        )
    app = web.Application(middlewares=middlewares, client_max_size=state.cfg.frame_max_bytes)
    app[STATE] = state

    async def lifecycle(app: web.Application):
        state.batcher.start()
        reaper = asyncio.get_running_loop().create_task(_reap_idle(app))
        yield
        reaper.cancel()
        await state.batcher.stop()
        await asyncio.gather(reaper, return_exceptions=True)

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/forward", forward)
    app.router.add_post("/v1/release", release)
    app.router.add_post("/v1/cancel", release)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/info", info)
    app.router.add_get("/v1/vocab", vocab)
    add_chain_routes(app, state, refusal_code)  # topology: chain (docs/design.md, "The chain data plane")
    return app
