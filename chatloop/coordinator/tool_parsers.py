"""Tool calls in the model's output, per family, into OpenAI ``tool_calls``; whole replies and streams.

Formats (see ``tool_prompt.py`` and ``tool_grammar.py``):

- hermes: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, text around them is content;
- llama3: the reply is ``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``, several
  separated by ``;``);
- mistral: content, then ``[TOOL_CALLS]`` and a JSON list of ``{"name", "arguments", "id"}`` (or the newer
  ``[TOOL_CALLS]name[ARGS]{...}``);
- generic: the reply is ``{"tool_call": {...}}``, ``{"tool_calls": [...]}`` or ``{"response": "..."}``.

A call of a tool the request did not declare, or with arguments that are not a JSON object, is not a call:
the reply then stays text. Calls get ids ``call_<24 letters and digits>`` (Mistral: the model's own 9-character
id, which its template checks), ``function.arguments`` is a JSON string, as OpenAI returns it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

from chatloop.coordinator.tool_calls import ToolRequest, new_call_id

log = logging.getLogger(__name__)

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_MISTRAL = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"
_DECODER = json.JSONDecoder()
_RESPONSE_START = re.compile(r'\s*\{\s*"response"\s*:\s*"')


@dataclass
class ParsedReply:
    content: str | None  # None when the reply is only calls
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI shape

    @property
    def finish_reason(self) -> str | None:
        """``tool_calls`` when the reply called tools (else the generation's own reason applies)."""
        return "tool_calls" if self.tool_calls else None


def _openai_call(obj, req: ToolRequest, args_keys: tuple[str, ...], keep_id: bool = False) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if req.by_name(obj["name"]) is None:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    call_id = obj.get("id") if keep_id and isinstance(obj.get("id"), str) and obj["id"] else new_call_id()
    fn = {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}
    return {"id": call_id, "type": "function", "function": fn}


def _json_values(text: str) -> list | None:
    """The JSON values ``text`` holds one after another (separated by whitespace or ``;``), or None."""
    values, i, n = [], 0, len(text)
    while True:
        while i < n and text[i] in " \t\r\n;":
            i += 1
        if i >= n:
            return values
        try:
            value, i = _DECODER.raw_decode(text, i)
        except (ValueError, RecursionError):
            return None
        values.append(value)


def _hermes(text: str, req: ToolRequest) -> ParsedReply:
    calls, content, pos = [], [], 0
    while True:
        start = text.find(_HERMES_OPEN, pos)
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        end = text.find(_HERMES_CLOSE, start)
        body = text[start + len(_HERMES_OPEN) : end if end >= 0 else len(text)]
        values = _json_values(body)
        call = _openai_call(values[0], req, ("arguments", "parameters")) if values and len(values) == 1 else None
        if call is None:
            return ParsedReply(text)
        calls.append(call)
        if end < 0:
            break
        pos = end + len(_HERMES_CLOSE)
    if not calls:
        return ParsedReply(text)  # no call: the reply is text as written (never None)
    rest = "".join(content).strip()
    return ParsedReply(rest or None, calls)


def _llama3(text: str, req: ToolRequest) -> ParsedReply:
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :]
    if not body.lstrip().startswith("{"):
        return ParsedReply(text)
    values = _json_values(body)
    if not values:
        return ParsedReply(text)
    calls = [_openai_call(v, req, ("parameters", "arguments")) for v in values]
    if any(c is None for c in calls):
        return ParsedReply(text)
    return ParsedReply(None, calls)


_MISTRAL_ARGS = re.compile(r"\s*([a-zA-Z0-9_-]{1,64})\[ARGS\]")


def _mistral(text: str, req: ToolRequest) -> ParsedReply:
    start = text.find(_MISTRAL)
    if start < 0:
        return ParsedReply(text)
    before, body = text[:start].strip(), text[start + len(_MISTRAL) :]
    calls: list[dict | None] = []
    values = _json_values(body)
    if values and len(values) == 1 and isinstance(values[0], list):
        calls = [_openai_call(v, req, ("arguments",), keep_id=True) for v in values[0]]
    else:
        # [TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...} (Mistral's tokenizer v11 and later)
        for piece in body.split(_MISTRAL):
            m = _MISTRAL_ARGS.match(piece)
            parsed = _json_values(piece[m.end() :]) if m else None
            ok = parsed is not None and len(parsed) == 1
            calls.append(
                _openai_call({"name": m.group(1), "arguments": parsed[0]}, req, ("arguments",)) if ok else None
            )
    if not calls or any(c is None for c in calls):
        return ParsedReply(text)
    return ParsedReply(before or None, calls)


def _generic(text: str, req: ToolRequest) -> ParsedReply:
    values = _json_values(text)
    if not values or len(values) != 1 or not isinstance(values[0], dict):
        return ParsedReply(text)
    obj = values[0]
    if isinstance(obj.get("response"), str) and len(obj) == 1:
        return ParsedReply(obj["response"])
    raw = obj.get("tool_calls") if "tool_calls" in obj else [obj.get("tool_call")]
    if not isinstance(raw, list) or not raw or len(obj) != 1:
        return ParsedReply(text)
    calls = [_openai_call(v, req, ("arguments",), keep_id=False) for v in raw]
    if any(c is None for c in calls):
        return ParsedReply(text)
    return ParsedReply(None, calls)


_PARSERS = {"hermes": _hermes, "llama3": _llama3, "mistral": _mistral, "generic": _generic}


def parse_reply(text: str, fmt: str, req: ToolRequest | None) -> ParsedReply:
    """The reply's content and tool calls. With no tools offered (``req`` None or ``none``) all is content."""
    if req is None or req.choice == "none":
        return ParsedReply(text)
    return _PARSERS[fmt](text, req)


# -- streaming -----------------------------------------------------------------------------------------


def _held_prefix(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``marker`` (to hold back)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _string_prefix(raw: str) -> tuple[str | None, bool]:
    """The decoded part of a JSON string body (after its opening quote) that is complete, and whether the
    closing quote was reached. An escape is decoded only once all of it has arrived."""
    i, n, closed = 0, len(raw), False
    while i < n:
        c = raw[i]
        if c == '"':
            closed = True
            break
        if c == "\\":
            if i + 1 >= n:
                break
            if raw[i + 1] == "u":
                if i + 6 > n:
                    break
                high = re.fullmatch(r"[dD][89abAB][0-9a-fA-F]{2}", raw[i + 2 : i + 6])
                if high:  # a high surrogate needs its pair
                    if i + 12 > n:
                        break
                    i += 12
                    continue
                i += 6
                continue
            i += 2
            continue
        i += 1
    try:
        return json.loads('"' + raw[:i] + '"'), closed
    except (ValueError, RecursionError):
        return None, False  # not a valid JSON string: the whole reply is judged at the end


class ToolCallStream:
    """Turns streamed text into OpenAI ``delta`` pieces: ``{"content": ...}`` and ``{"tool_calls": [...]}``.

    Content streams as it comes, except text that may start a call marker, which waits for the next piece.
    A call is sent whole (``index``, ``id``, ``type``, ``function.name`` and all of ``function.arguments``) once
    it is complete, which OpenAI clients accumulate like any split call. ``finish()`` flushes what is left
    and tells whether any call was sent (then the finish reason is ``tool_calls``).
    """

    def __init__(self, fmt: str, req: ToolRequest | None) -> None:
        self.fmt = fmt if req is not None and req.choice != "none" else "none"
        self.req = req
        self.text = ""  # everything fed so far
        self.pos = 0  # how much of ``text`` has been dealt with
        self.n_calls = 0
        self.sent_content = ""  # generic format: the response text already sent

    def _calls(self, calls: list[dict]) -> list[dict]:
        out = []
        for c in calls:
            out.append({"index": self.n_calls, **c})
            self.n_calls += 1
        return [{"tool_calls": out}] if out else []

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        if self.fmt == "none":
            return self._content_upto(len(self.text))
        if self.fmt == "hermes":
            return self._hermes(final=False)
        if self.fmt == "mistral":
            return self._marker(_MISTRAL, final=False)
        if self.fmt == "llama3":
            return self._llama3(final=False)
        return self._generic(final=False)

    def finish(self) -> tuple[list[dict], bool]:
        if self.fmt == "none":
            out = self._content_upto(len(self.text))
        elif self.fmt == "hermes":
            out = self._hermes(final=True)
        elif self.fmt == "mistral":
            out = self._marker(_MISTRAL, final=True)
        elif self.fmt == "llama3":
            out = self._llama3(final=True)
        else:
            out = self._generic(final=True)
        return out, self.n_calls > 0

    def _content_upto(self, end: int) -> list[dict]:
        piece = self.text[self.pos : end]
        self.pos = end
        if self.n_calls and not piece.strip():
            return []  # whitespace between or after calls is not content
        return [{"content": piece}] if piece else []

    def _hermes(self, final: bool) -> list[dict]:
        out: list[dict] = []
        while True:
            start = self.text.find(_HERMES_OPEN, self.pos)
            if start < 0:
                hold = 0 if final else _held_prefix(self.text[self.pos :], _HERMES_OPEN)
                if self.n_calls and not final and not self.text[self.pos :].strip():
                    return out  # wait: whitespace after a call may precede the next call
                out += self._content_upto(len(self.text) - hold)
                return out
            out += self._content_upto(start)
            end = self.text.find(_HERMES_CLOSE, start)
            if end < 0 and not final:
                return out
            stop = len(self.text) if end < 0 else end + len(_HERMES_CLOSE)
            parsed = _hermes(self.text[start:stop], self.req)
            if parsed.tool_calls:
                out += self._calls(parsed.tool_calls)
                self.pos = stop
            else:
                out += self._content_upto(stop)

    def _marker(self, marker: str, final: bool) -> list[dict]:
        start = self.text.find(marker, self.pos)
        if start < 0:
            hold = 0 if final else _held_prefix(self.text[self.pos :], marker)
            return self._content_upto(len(self.text) - hold)
        out = self._content_upto(start)
        if not final:
            return out
        parsed = _mistral(self.text[start:], self.req)
        if parsed.tool_calls:
            self.pos = len(self.text)
            return out + self._calls(parsed.tool_calls)
        return out + self._content_upto(len(self.text))

    def _llama3(self, final: bool) -> list[dict]:
        head = self.text.lstrip()
        maybe_call = head.startswith("{") or head.startswith(_PYTHON_TAG) or _PYTHON_TAG.startswith(head)
        if self.pos == 0 and maybe_call:
            if not final:
                return []  # a call, or text starting with "{": known at the end
            parsed = _llama3(self.text, self.req)
            if parsed.tool_calls:
                self.pos = len(self.text)
                return self._calls(parsed.tool_calls)
        return self._content_upto(len(self.text))

    def _generic(self, final: bool) -> list[dict]:
        m = _RESPONSE_START.match(self.text)
        if m:
            decoded, _closed = _string_prefix(self.text[m.end() :])
            if final:
                parsed = _generic(self.text, self.req)
                if parsed.content is not None:
                    decoded = parsed.content
            if decoded is None or not decoded.startswith(self.sent_content):
                return []  # nothing new that agrees with what was sent
            new = decoded[len(self.sent_content) :]
            self.sent_content = decoded
            self.pos = len(self.text)
            return [{"content": new}] if new else []
        if not final:
            return []
        parsed = _generic(self.text, self.req)
        self.pos = len(self.text)
        if parsed.tool_calls:
            return self._calls(parsed.tool_calls)
        return [{"content": parsed.content}] if parsed.content else []
