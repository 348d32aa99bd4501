"""The generation endpoints: OpenAI completions and chat completions (streamed or not) and the native
``/v1/inference``. A request is validated (``api_schema``), turned into a sequence (``request_policy``),
scheduled (``scheduler``) and its events shaped into responses (``responses``)."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiohttp import web

from chatloop.coordinator.admission import AdmissionError
from chatloop.coordinator.api_schema import GenerationRequest, RequestError, parse_chat, parse_completion, parse_native
from chatloop.coordinator.request_policy import build_sequence, read_json
from chatloop.coordinator.responses import Shaper, usage
from chatloop.coordinator.sequence import FinishEvent, Sequence, TokenEvent
from chatloop.coordinator.state import STATE, CoordinatorState, ready_problem
from chatloop.coordinator.structured_request import apply_output_fields
from chatloop.coordinator.tool_parsers import ToolCallStream, parse_reply
from chatloop.http_util import error_response
from chatloop.logs import request_id_var, trace_id_var

log = logging.getLogger(__name__)


def unavailable(message: str) -> web.Response:
    return error_response(503, message, "unavailable", "unavailable", headers={"Retry-After": "2"})


async def _handle(request: web.Request, kind: str) -> web.StreamResponse:
    st = request.app[STATE]
    start = time.monotonic()
    problem = ready_problem(st)
    try:
        body = await read_json(request)
        n_vocab = st.tokenizer.n_vocab if st.tokenizer else 1 << 30
        parse = {"completion": parse_completion, "chat": parse_chat, "native": parse_native}[kind]
        req = parse(body, n_vocab)
        if problem:
            st.metrics.requests.labels(model=st.model_name, status="unavailable").inc()
            return unavailable(problem)
        apply_output_fields(body, req, st.tokenizer.vocab, st.tool_caps)
        seq = build_sequence(st, req)
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
            resp = await _collect(st, seq, shaper, req)
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


async def _collect(st: CoordinatorState, seq: Sequence, shaper: Shaper, req: GenerationRequest) -> web.Response:
    kind = req.kind
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
        if req.tools is not None:
            reply = parse_reply(text, req.tool_format, req.tools)
            finish = reply.finish_reason or ev.reason
            return web.json_response(shaper.full(reply.content, events, finish, seq, tool_calls=reply.tool_calls))
        return web.json_response(shaper.full(text, events, ev.reason, seq))


async def _stream(
    request: web.Request, st: CoordinatorState, seq: Sequence, shaper: Shaper, req: GenerationRequest
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await resp.prepare(request)

    async def send(obj: dict | str) -> None:
        data = obj.encode() if isinstance(obj, str) else orjson.dumps(obj)  # NOTE: a chunk per token: orjson
        await resp.write(b"data: " + data + b"\n\n")

    if shaper.kind == "chat":
        await send(shaper.chunk("", [], first=True))
    pending: list[TokenEvent] = []
    # With tools, text goes through the call parser: content streams, each call is sent whole once complete.
    calls = ToolCallStream(req.tool_format, req.tools) if req.tools is not None else None

    async def send_deltas(deltas: list[dict]) -> None:
        nonlocal pending
        for delta in deltas:
            await send(shaper.delta_chunk(delta, pending))
            pending = []  # NOTE: logprobs of held-back text travel with the next delta sent

    while True:
        ev = await seq.events.get()
        if isinstance(ev, TokenEvent):
            pending.append(ev)
            # NOTE: a token whose text is held back (part of a character or of a possible stop string)
            # travels with the next chunk that has text, so every chunk is valid UTF-8 and no stop leaks.
            if ev.text and calls is not None:
                await send_deltas(calls.feed(ev.text))
            elif ev.text:
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
        elif calls is not None:
            await send_deltas(calls.feed(ev.text))
            deltas, called = calls.finish()
            await send_deltas(deltas)
            await send(shaper.chunk("", pending, finish="tool_calls" if called else ev.reason))
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
