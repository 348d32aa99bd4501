"""Request policy: from a validated request to a sequence the scheduler can run (prompt tokens from the chat
template or the text, the model name, the context and max_tokens limits)."""

from __future__ import annotations

import dataclasses
import json
import uuid

from aiohttp import web

from chatloop.coordinator.api_schema import GenerationRequest, RequestError
from chatloop.coordinator.chat_template import ChatTemplateError
from chatloop.coordinator.sequence import Sequence
from chatloop.coordinator.state import STATE, CoordinatorState
from chatloop.coordinator.tool_prompt import probe, render_chat
from chatloop.logs import request_id_var, trace_id_var


async def read_json(request: web.Request):
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
            # The request's tools through the template's own syntax, else the generic format (tool_prompt.py).
            text = render_chat(st.template, st.tool_caps or probe(st.template), req.messages, req.tools).prompt
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


def build_sequence(st: CoordinatorState, req: GenerationRequest) -> Sequence:
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
    if req.speculative and req.speculative.get("method") == "draft" and not st.cfg.speculative.draft_model:
        raise RequestError("speculative.method draft: this server has no draft model", "speculative.method")
    rid = request_id_var.get() or uuid.uuid4().hex[:24]
    return Sequence(
        request_id=rid,
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=req.sampling,
        stop=req.stop,
        trace_id=trace_id_var.get() or uuid.uuid4().hex,
        speculative=dataclasses.replace(st.cfg.speculative, **req.speculative) if req.speculative else None,
    )
