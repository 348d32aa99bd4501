"""Tools in the prompt: through the model's own chat template when it knows tools, else a generic format.

Hugging Face templates take a ``tools`` variable (Llama 3.1/3.2, Qwen2.5/Qwen3, Hermes, Mistral) and print
the assistant's ``tool_calls`` and ``tool`` replies in the family's own syntax, which the model was trained on.
Whether a template does is found by rendering probes, as llama.cpp's template capabilities check does, not by
its name: a probe tool must appear in the output, and a probe call and reply must appear in a conversation.

The generic format (llama-server's fallback) is for templates without tools:

- a system message lists the tools as JSON and asks for a JSON reply, either
  ``{"tool_call": {"name": ..., "arguments": {...}}}`` (``{"tool_calls": [...]}`` when several calls are allowed)
  or ``{"response": "..."}``;
- earlier assistant calls become that JSON as the message's text; tool replies become ``user`` messages
  ``{"tool_response": {"tool": name, "tool_call_id": id, "content": ...}}`` (templates without tools often
  refuse a ``tool`` role).

The output of the generic format is always constrained by a grammar (``tool_grammar.py``), even for
``tool_choice: auto``, so that the reply is one of those shapes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from chatloop.coordinator.chat_template import ChatTemplate, ChatTemplateError
from chatloop.coordinator.tool_calls import ToolRequest

log = logging.getLogger(__name__)

# Families whose output ``tool_parsers`` reads; "generic" works with any template.
FORMATS = ("hermes", "llama3", "mistral", "generic")

_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "chatloop_probe_tool",
        "description": "probe",
        "parameters": {"type": "object", "properties": {"chatloop_probe_arg": {"type": "string"}}},
    },
}
_PROBE_CALL = {
    "id": "call_chatloopprobe",
    "type": "function",
    "function": {"name": "chatloop_probe_call", "arguments": {"chatloop_probe_arg": "x"}},
}

GENERIC_INSTRUCTIONS = (
    "You can call the following tools to satisfy the user's request:\n{tools}\n\n"
    "Respond in JSON format, either with `{call_key}` (a request to call tools) or with `response` (your reply "
    "to the user's request), and nothing else:\n{shapes}"
)


@dataclass(frozen=True)
class TemplateTools:
    """What a chat template does with tools."""

    tools: bool  # prints the ``tools`` it is given
    calls: bool  # prints assistant ``tool_calls`` and ``tool`` replies
    family: str  # hermes | llama3 | mistral | generic: the syntax the model writes calls in


def _family(source: str) -> str:
    if "<tool_call>" in source:
        return "hermes"  # Qwen2.5, Qwen3, Hermes 2/3
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|start_header_id|>" in source or "<|python_tag|>" in source:
        return "llama3"
    return "generic"


def probe(template: ChatTemplate) -> TemplateTools:
    """Render probes to see what the template does with tools (cheap: call once per template and keep it)."""
    user = {"role": "user", "content": "chatloop probe question"}
    try:
        with_tools = template.render([user], add_generation_prompt=True, tools=[_PROBE_TOOL])
        tools = "chatloop_probe_tool" in with_tools
    except ChatTemplateError:
        tools = False
    convo = [
        user,
        {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
        {"role": "tool", "content": "chatloop probe reply", "tool_call_id": _PROBE_CALL["id"]},
    ]
    try:
        out = template.render(convo, add_generation_prompt=True, tools=[_PROBE_TOOL] if tools else None)
        calls = "chatloop_probe_call" in out and "chatloop probe reply" in out
    except ChatTemplateError:
        calls = False
    family = _family(template.source) if tools else "generic"
    log.info("chat template tools: %s, calls: %s, format: %s", tools, calls, family)
    return TemplateTools(tools, calls, family)


def _generic_call(call: dict, parallel: bool) -> dict:
    fn = call["function"]
    out = {"name": fn["name"], "arguments": fn["arguments"]}
    if parallel:
        out["id"] = call["id"]
    return out


def generic_messages(messages: list[dict], req: ToolRequest | None) -> list[dict]:
    """The conversation in the generic format: tool calls and replies as JSON text (see the module notes)."""
    parallel = bool(req and req.parallel)
    out: list[dict] = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [_generic_call(c, parallel) for c in m["tool_calls"]]
            body = {"tool_calls": calls} if parallel or len(calls) > 1 else {"tool_call": calls[0]}
            out.append({"role": "assistant", "content": json.dumps(body, ensure_ascii=False)})
        elif m["role"] == "tool":
            reply = {"tool": m.get("name", ""), "tool_call_id": m["tool_call_id"], "content": m["content"]}
            out.append({"role": "user", "content": json.dumps({"tool_response": reply}, ensure_ascii=False)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if req is None or req.choice == "none":
        return out
    allowed = req.allowed()
    listing = json.dumps([t.to_openai()["function"] for t in allowed], ensure_ascii=False, indent=2)
    call_key = "tool_calls" if req.parallel else "tool_call"
    example = '{"name": "<tool name>", "arguments": {<arguments>}}'
    if req.parallel:
        shapes = f'{{"tool_calls": [{example}, ...]}}'
    else:
        shapes = f'{{"tool_call": {example}}}'
    if req.choice == "auto":
        shapes += '\nor\n{"response": "<your reply>"}'
    text = GENERIC_INSTRUCTIONS.format(tools=listing, call_key=call_key, shapes=shapes)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


@dataclass(frozen=True)
class RenderedChat:
    prompt: str
    format: str  # the syntax the reply's tool calls are parsed in (one of FORMATS)


def _own_template(caps: TemplateTools, messages: list[dict]) -> bool:
    """Whether the model's own template can render this conversation with tools (else: the generic format)."""
    has_history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    return caps.tools and (caps.calls or not has_history)


def reply_format(caps: TemplateTools, messages: list[dict]) -> str:
    """The syntax the reply's tool calls will be in (one of FORMATS), as ``render_chat`` decides it."""
    return caps.family if _own_template(caps, messages) else "generic"


def render_chat(
    template: ChatTemplate, caps: TemplateTools, messages: list[dict], req: ToolRequest | None
) -> RenderedChat:
    """The prompt for ``messages`` with ``req``'s tools, and the format the reply will use.

    ``tool_choice: none`` leaves the tools out of the prompt (the model cannot call what it does not see)."""
    offer = req is not None and req.choice != "none"
    if _own_template(caps, messages):
        tools = [t.to_openai() for t in req.allowed()] if offer else None
        # NOTE: templates test ``tools is not none``: pass None, never an empty list, when there are none.
        return RenderedChat(template.render(messages, add_generation_prompt=True, tools=tools), caps.family)
    generic = generic_messages(messages, req if offer else None)
    try:
        return RenderedChat(template.render(generic), "generic")
    except ChatTemplateError:
        if not offer or generic[0]["role"] != "system" or len(generic) < 2 or generic[1]["role"] != "user":
            raise
        # Some templates refuse a system turn (Gemma-style, strict alternation): the instructions then open the
        # first user message, as llama.cpp's template polyfills do.
        merged = {"role": "user", "content": generic[0]["content"] + "\n\n" + generic[1]["content"]}
        return RenderedChat(template.render([merged, *generic[2:]]), "generic")
