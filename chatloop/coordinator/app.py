"""The coordinator's HTTP API: OpenAI-compatible completions and chat (streamed or not), the native
``/v1/inference``, models, health, readiness, metrics and the cluster view."""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from chatloop.config import CoordinatorConfig
from chatloop.coordinator.api_schema import GenerationRequest, RequestError, parse_chat, parse_completion, parse_native
from chatloop.coordinator.chat_template import ChatTemplate, ChatTemplateError
from chatloop.coordinator.cluster import Cluster
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.openapi import openapi_document
from chatloop.coordinator.responses import Shaper, usage
from chatloop.coordinator.scheduler import AdmissionError, FinishEvent, Scheduler, Sequence, TokenEvent
from chatloop.coordinator.web import WEB_PATHS, add_web_routes
from chatloop.engine.tokenizer import Tokenizer
from chatloop.http_util import bearer, context_middleware, error_response, secret_equals, token_middleware
from chatloop.logs import request_id_var, trace_id_var
from chatloop.metrics_util import metrics_response
from converters.manifest import ManifestError, load_manifest

log = logging.getLogger(__name__)


@dataclass
class CoordinatorState:
    cfg: CoordinatorConfig
    metrics: CoordinatorMetrics
    cluster: Cluster
    model_name: str
    tokenizer: Tokenizer | None = None
    template: ChatTemplate | None = None
    scheduler: Scheduler | None = None
    draining: bool = False
    boot_error: str | None = None
    tmpdir: tempfile.TemporaryDirectory | None = None
    tasks: set = field(default_factory=set)


STATE = web.AppKey("coordinator_state", CoordinatorState)
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json", *WEB_PATHS)  # the pages ask for the key


def _ready_problem(st: CoordinatorState) -> str | None:
    if st.draining:
        return "coordinator is draining"
    if st.tokenizer is None or st.scheduler is None:
        return f"starting: {st.boot_error or 'loading the vocabulary'}"
    if not st.cluster.ready():
        down = [k for k, reps in enumerate(st.cluster.stages) if not any(r.routable() for r in reps)]
        return f"not ready: no healthy replica for stage(s) {down}"
    return None


def _unavailable(message: str) -> web.Response:
    return error_response(503, message, "unavailable", "unavailable", headers={"Retry-After": "2"})


# -- generation ----------------------------------------------------------------------------------------


async def _read_json(request: web.Request):
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(f"request body exceeds {request.app[STATE].cfg.max_body_bytes} bytes", status=413) from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also: integers over 4300 digits, nesting too deep
        raise RequestError(f"request body is not valid JSON: {str(exc)[:200]}") from None


def _prompt_tokens(st: CoordinatorState, req: GenerationRequest) -> list[int]:
    assert st.tokenizer is not None
    tok = st.tokenizer
    if req.prompt_tokens is not None:
        return req.prompt_tokens
    if req.messages is not None:
        assert st.template is not None
        try:
            text = st.template.render(req.messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise RequestError(str(exc), "messages") from None
    else:
        text = req.prompt_text or ""
    if len(text.encode("utf-8", "surrogatepass")) > st.cfg.max_prompt_bytes:
        raise RequestError(f"prompt exceeds {st.cfg.max_prompt_bytes} bytes", "prompt")
    bos_text = st.template.bos_token if st.template else ""
    add_special = not (bos_text and text.startswith(bos_text))
    tokens = tok.tokenize(text, add_special=add_special, parse_special=True)
    if not tokens:
        raise RequestError("the prompt is empty", "prompt")
    return tokens


def _plan_request(st: CoordinatorState, req: GenerationRequest) -> Sequence:
    assert st.scheduler is not None
    if req.model and req.model != st.model_name:
        raise RequestError(
            f"model '{req.model}' does not exist; this server serves '{st.model_name}'",
            "model",
            status=404,
            code="model_not_found",
        )
    prompt = _prompt_tokens(st, req)
    limit = st.scheduler.context_limit()
    if limit and len(prompt) >= limit:
        raise RequestError(
            f"the prompt has {len(prompt)} tokens; this server's context holds {limit}",
            "prompt",
            code="context_length_exceeded",
        )
    room = limit - len(prompt) if limit else st.cfg.max_tokens_default
    if req.max_tokens is None:
        max_tokens = min(st.cfg.max_tokens_default, room)
    elif req.max_tokens > room:
        raise RequestError(
            f"max_tokens {req.max_tokens} + prompt {len(prompt)} tokens exceed the context of {limit}",
            "max_tokens",
            code="context_length_exceeded",
        )
    else:
        max_tokens = req.max_tokens
    rid = request_id_var.get() or uuid.uuid4().hex[:24]
    return Sequence(
        request_id=rid,
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=req.sampling,
        stop=req.stop,
        trace_id=trace_id_var.get() or uuid.uuid4().hex,
    )


async def _handle(request: web.Request, kind: str) -> web.StreamResponse:
    st = request.app[STATE]
    start = time.monotonic()
    problem = _ready_problem(st)
    try:
        body = await _read_json(request)
        n_vocab = st.tokenizer.n_vocab if st.tokenizer else 1 << 30
        parse = {"completion": parse_completion, "chat": parse_chat, "native": parse_native}[kind]
        req = parse(body, n_vocab)
        if problem:
            st.metrics.requests.labels(model=st.model_name, status="unavailable").inc()
            return _unavailable(problem)
        seq = _plan_request(st, req)
    except RequestError as exc:
        st.metrics.requests.labels(model=st.model_name, status="bad_request").inc()
        etype = "invalid_request_error" if exc.status != 404 else "not_found_error"
        return error_response(exc.status, str(exc), etype, exc.code, exc.param)
    assert st.scheduler is not None
    try:
        st.scheduler.submit(seq)
    except AdmissionError as exc:
        st.metrics.requests.labels(model=st.model_name, status="rejected").inc()
        return error_response(
            exc.status, str(exc), "unavailable", "server_busy", headers={"Retry-After": str(exc.retry_after or 1)}
        )
    st.metrics.prompt_tokens.inc(len(seq.prompt))
    request_id_var.set(seq.request_id)
    trace_id_var.set(seq.trace_id)
    prefix = {"chat": "chatcmpl-", "completion": "cmpl-", "native": "inf-"}[kind]
    shaper = Shaper(
        "chat" if kind == "chat" else "completion", st.model_name, prefix + seq.request_id, st.tokenizer, req.logprobs
    )
    status = "error"
    try:
        if req.stream:
            resp = await _stream(request, st, seq, shaper, req)
        else:
            resp = await _collect(st, seq, shaper, kind)
        status = "ok" if seq.finish_reason in ("stop", "length") else "error"
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        status = "cancelled"
        raise
    finally:
        if not seq.done:
            st.scheduler.cancel(seq)  # client went away: free the sequence in every stage
        st.metrics.requests.labels(model=st.model_name, status=status).inc()
        elapsed = time.monotonic() - start
        st.metrics.request_duration.observe(elapsed)
        log.info(
            "%s %s: %d prompt + %d generated tokens in %.3f s (%s)",
            kind,
            status,
            len(seq.prompt),
            len(seq.generated),
            elapsed,
            seq.finish_reason or "unfinished",
        )


async def _collect(st: CoordinatorState, seq: Sequence, shaper: Shaper, kind: str) -> web.Response:
    events: list[TokenEvent] = []
    parts: list[str] = []
    while True:
        ev = await seq.events.get()
        if isinstance(ev, TokenEvent):
            events.append(ev)
            parts.append(ev.text)
            continue
        assert isinstance(ev, FinishEvent)
        if ev.reason == "error":
            return error_response(
                ev.status,
                ev.message,
                "unavailable" if ev.status == 503 else "server_error",
                "generation_failed",
                headers={"Retry-After": "2"} if ev.status == 503 else None,
            )
        parts.append(ev.text)
        text = "".join(parts)
        if kind == "native":
            return web.json_response(
                {
                    "request_id": seq.request_id,
                    "model_id": st.model_name,
                    "text": text,
                    "tokens": [e.token for e in events],
                    "finish_reason": ev.reason,
                    "usage": usage(seq),
                }
            )
        return web.json_response(shaper.full(text, events, ev.reason, seq))


async def _stream(
    request: web.Request, st: CoordinatorState, seq: Sequence, shaper: Shaper, req: GenerationRequest
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await resp.prepare(request)

    async def send(obj: dict | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        await resp.write(f"data: {data}\n\n".encode())

    if shaper.kind == "chat":
        await send(shaper.chunk("", [], first=True))
    pending: list[TokenEvent] = []
    while True:
        ev = await seq.events.get()
        if isinstance(ev, TokenEvent):
            pending.append(ev)
            # NOTE: a token whose text is held back (part of a character or of a possible stop string)
            # travels with the next chunk that has text, so every chunk is valid UTF-8 and no stop leaks.
            if ev.text:
                await send(shaper.chunk("".join(e.text for e in pending), pending))
                pending = []
            continue
        assert isinstance(ev, FinishEvent)
        if ev.reason == "error":
            await send(
                {
                    "error": {
                        "message": ev.message,
                        "type": "unavailable" if ev.status == 503 else "server_error",
                        "param": None,
                        "code": "generation_failed",
                    }
                }
            )
        else:
            text = "".join(e.text for e in pending) + ev.text
            await send(shaper.chunk(text, pending, finish=ev.reason))
            if req.include_usage:
                await send(shaper.usage_chunk(seq))
        await send("[DONE]")
        await resp.write_eof()
        return resp


async def completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "chat")


async def inference(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "native")


# -- everything else -----------------------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    card = {"id": st.model_name, "object": "model", "created": 0, "owned_by": "chatloop"}
    return web.json_response({"object": "list", "data": [card]})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    problem = _ready_problem(request.app[STATE])
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
            "ready": _ready_problem(st) is None,
            "replicas": st.cluster.snapshot(),
            "waiting": len(sched.waiting) if sched else 0,
            "active": len(sched.active) if sched else 0,
            "kv_budget_tokens": sched.kv_budget() if sched else None,
            "kv_reserved_tokens": sched.reserved if sched else None,
        }
    )


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


# -- start-up ------------------------------------------------------------------------------------------


def _model_name(cfg: CoordinatorConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    if cfg.model_dir:
        try:
            return load_manifest(cfg.model_dir).model
        except ManifestError:
            pass
    return "chatloop"


async def _boot(app: web.Application) -> None:
    """Load the vocabulary (from model_dir, else from stage 0) and start scheduling; retry until it works."""
    st = app[STATE]
    delay = 0.5
    while st.tokenizer is None:
        try:
            if st.cfg.model_dir:
                m = load_manifest(st.cfg.model_dir)
                path = pathlib.Path(st.cfg.model_dir) / m.stages[0].file
            else:
                data = await st.cluster.fetch_vocab()
                st.tmpdir = tempfile.TemporaryDirectory(prefix="chatloop-vocab-")
                path = pathlib.Path(st.tmpdir.name) / "vocab.gguf"
                path.write_bytes(data)
            tokenizer = await asyncio.get_running_loop().run_in_executor(None, Tokenizer, path)
            st.template = ChatTemplate.from_tokenizer(tokenizer)
            st.tokenizer = tokenizer
        except (OSError, RuntimeError, ManifestError, ChatTemplateError) as exc:
            st.boot_error = str(exc)
            log.warning("vocabulary not loaded yet: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    st.boot_error = None
    st.scheduler = Scheduler(st.cfg, st.cluster, st.tokenizer, st.metrics)
    st.scheduler.start()
    log.info("coordinator ready to schedule for model %s", st.model_name)


def create_app(cfg: CoordinatorConfig) -> web.Application:
    model = _model_name(cfg)
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
        boot = asyncio.get_running_loop().create_task(_boot(app), name="boot")
        yield
        boot.cancel()
        await asyncio.gather(boot, return_exceptions=True)
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
