"""The coordinator's HTTP app: routes, middlewares, lifecycle, and the status endpoints (models, health,
readiness, metrics, cluster view, OpenAPI). Generation lives in ``generation``, start-up in ``startup``."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from chatloop.config import CoordinatorConfig
from chatloop.coordinator.cluster import Cluster
from chatloop.coordinator.generation import chat_completions, completions, inference
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.openapi import openapi_document
from chatloop.coordinator.startup import boot, model_name
from chatloop.coordinator.state import OPEN_PATHS, STATE, CoordinatorState, ready_problem
from chatloop.coordinator.web import add_web_routes
from chatloop.http_util import bearer, context_middleware, error_response, secret_equals, token_middleware
from chatloop.metrics_util import metrics_response

log = logging.getLogger(__name__)

__all__ = ["STATE", "CoordinatorState", "create_app"]


async def models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    card = {"id": st.model_name, "object": "model", "created": 0, "owned_by": "chatloop"}
    return web.json_response({"object": "list", "data": [card]})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    problem = ready_problem(request.app[STATE])
    if problem:
        return web.json_response({"status": "unavailable", "reason": problem}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.metrics.process.refresh()
    return metrics_response(st.metrics.registry)


async def cluster_view(request: web.Request) -> web.Response:
    st = request.app[STATE]
    sched = st.scheduler
    return web.json_response(
        {
            "model": st.model_name,
            "ready": ready_problem(st) is None,
            "replicas": st.cluster.snapshot(),
            "waiting": len(sched.waiting) if sched else 0,
            "active": len(sched.active) if sched else 0,
            "kv_budget_tokens": sched.kv_budget() if sched else None,
            "kv_reserved_tokens": sched.reserved if sched else None,
            "prefix_cache": _prefix_cache_view(sched.cache if sched else None),
            "speculative": sched.speculator.view() if sched else None,
        }
    )


def _prefix_cache_view(cache) -> dict | None:
    if cache is None:
        return None
    return {
        "entries": len(cache.entries),
        "tokens": cache.tokens,
        "max_tokens": cache.max_tokens or None,
        "replica_tokens": {r.name: n for r, n in cache.replicas_tokens().items()},
    }


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app[STATE].model_name))


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # NOTE: keep the headers that tell the client what to do next (Allow on a 405, Retry-After).
        keep = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(
            exc.status,
            exc.reason or "error",
            "invalid_request_error" if exc.status < 500 else "server_error",
            headers=keep or None,
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:  # noqa: BLE001 - never answer a client with a traceback
        log.exception("unhandled error on %s", request.path)
        return error_response(500, "internal server error", "server_error", "internal_error")


def create_app(cfg: CoordinatorConfig) -> web.Application:
    model = model_name(cfg)
    metrics_ = CoordinatorMetrics(model)
    state = CoordinatorState(cfg=cfg, metrics=metrics_, cluster=Cluster(cfg, metrics_), model_name=model)
    middlewares = [error_middleware, context_middleware()]
    keys = cfg.security.api_keys
    if keys:
        middlewares.append(
            token_middleware(
                lambda r: any(secret_equals(bearer(r), k) for k in keys),
                OPEN_PATHS,
                "missing or invalid API key (Authorization: Bearer ...)",
            )
        )
    app = web.Application(middlewares=middlewares, client_max_size=cfg.max_body_bytes)
    app[STATE] = state

    async def lifecycle(app: web.Application):
        await state.cluster.start()
        booting = asyncio.get_running_loop().create_task(boot(app), name="boot")
        yield
        booting.cancel()
        await asyncio.gather(booting, return_exceptions=True)
        if state.scheduler:
            await state.scheduler.close()
        await state.cluster.close()
        if state.tokenizer:
            state.tokenizer.close()
        if state.tmpdir:
            state.tmpdir.cleanup()

    app.cleanup_ctx.append(lifecycle)
    r = app.router
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_post("/v1/inference", inference)
    r.add_get("/v1/models", models)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/cluster", cluster_view)
    r.add_get("/openapi.json", openapi)
    add_web_routes(app, STATE)  # GET / (chat), GET /cluster (live view) and /v1/cluster/live
    return app
