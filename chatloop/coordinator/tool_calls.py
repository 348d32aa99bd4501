"""``tools``, ``tool_choice``, ``parallel_tool_calls`` and the tool fields of chat messages, checked.

A request's tools become a ``ToolRequest``; each problem is a 400 naming the field (``tools[2].function.name``,
``tool_choice.function.name``, ``messages[3].tool_calls[0].function.arguments``). The messages keep the tool
fields Hugging Face chat templates read: an assistant's ``tool_calls`` with ``function.arguments`` as an
object (templates print it with ``tojson``), a tool reply's ``tool_call_id`` and ``name``.

Rendering lives in ``tool_prompt.py``, output parsing in ``tool_parsers.py``, grammars in ``tool_grammar.py``.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from chatloop.coordinator.api_schema import RequestError
from chatloop.coordinator.json_schema_check import SchemaError, check_schema

MAX_TOOLS = 128
MAX_TOOL_CALLS_PER_MESSAGE = 64
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ID_ALPHABET = string.ascii_letters + string.digits
CHOICES = ("none", "auto", "required")


class ToolError(RequestError):
    """A 400 naming the tool field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments (an object schema)
    strict: bool = False

    def to_openai(self) -> dict:
        """The tool as the request gave it (what chat templates receive as ``tools``)."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    choice: str  # none | auto | required | function
    function: str | None = None  # the named function when choice == "function"
    parallel: bool = False  # may the reply hold more than one call

    def allowed(self) -> tuple[Tool, ...]:
        """The tools a reply may call: the named one, or all."""
        if self.choice == "function":
            return tuple(t for t in self.tools if t.name == self.function)
        return self.tools if self.choice != "none" else ()

    def by_name(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def _tool(raw, i: int) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(raw, dict):
        raise ToolError(f"'{where}' must be an object", where)
    if raw.get("type", "function") != "function":
        raise ToolError(f"'{where}.type' must be \"function\" (the only tool type served)", f"{where}.type")
    unknown = sorted(set(raw) - {"type", "function"})
    if unknown:
        raise ToolError(f"'{where}' takes no '{unknown[0]}'", f"{where}.{unknown[0]}")
    fn = raw.get("function")
    if not isinstance(fn, dict):
        raise ToolError(f"'{where}.function' must be an object with a 'name'", f"{where}.function")
    unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise ToolError(f"'{where}.function' takes no '{unknown[0]}'", f"{where}.function.{unknown[0]}")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolError(
            f"'{where}.function.name' must be 1 to 64 letters, digits, '_' or '-'", f"{where}.function.name"
        )
    desc = fn.get("description", "")
    if not isinstance(desc, str):
        raise ToolError(f"'{where}.function.description' must be a string", f"{where}.function.description")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise ToolError(
            f"'{where}.function.parameters' must be a JSON schema of type object", f"{where}.function.parameters"
        )
    try:
        check_schema(params, f"{where}.function.parameters")
    except SchemaError as exc:
        raise ToolError(str(exc), exc.path) from None
    strict = fn.get("strict", False)
    if strict is not None and not isinstance(strict, bool):
        raise ToolError(f"'{where}.function.strict' must be true or false", f"{where}.function.strict")
    return Tool(name, desc, params, bool(strict))


def parse_tool_request(body: dict) -> ToolRequest | None:
    """The request's tools and choice; None when it declares no tools (and asks for none)."""
    raw_tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    if body.get("functions") is not None or body.get("function_call") is not None:
        key = "functions" if body.get("functions") is not None else "function_call"
        raise ToolError(f"the deprecated '{key}' is not supported; use 'tools' and 'tool_choice'", key)
    if raw_tools is None or raw_tools == []:
        if choice not in (None, "none", "auto"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(raw_tools, list):
        raise ToolError("'tools' must be a list of function tools", "tools")
    if len(raw_tools) > MAX_TOOLS:
        raise ToolError(f"'tools' takes at most {MAX_TOOLS} tools", "tools")
    tools = tuple(_tool(t, i) for i, t in enumerate(raw_tools))
    seen: set[str] = set()
    for i, t in enumerate(tools):
        if t.name in seen:
            raise ToolError(f"two tools are named '{t.name}'", f"tools[{i}].function.name")
        seen.add(t.name)
    function = None
    if choice is None:
        mode = "auto"
    elif isinstance(choice, str):
        if choice not in CHOICES:
            raise ToolError(f"'tool_choice' must be one of {', '.join(CHOICES)} or a named function", "tool_choice")
        mode = choice
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolError('\'tool_choice\' must be {"type": "function", "function": {"name": ...}}', "tool_choice")
        if fn["name"] not in seen:
            raise ToolError(
                f"'tool_choice' names the function '{fn['name'][:64]}', which is not among 'tools'",
                "tool_choice.function.name",
            )
        mode, function = "function", fn["name"]
    else:
        raise ToolError("'tool_choice' must be a string or an object", "tool_choice")
    # NOTE: one call unless asked for more, as llama-server: a grammar that allows "another call" lets a small model
    # repeat calls until max_tokens (seen with SmolLM2), and OpenAI clients do not send the field by default.
    return ToolRequest(tools, mode, function, bool(parallel))


# -- messages ------------------------------------------------------------------------------------------


def _call(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ToolError(f"'{where}' must be an object", "messages")
    if raw.get("type", "function") != "function":
        raise ToolError(f"'{where}.type' must be \"function\"", "messages")
    call_id = raw.get("id")
    if not isinstance(call_id, str) or not 0 < len(call_id) <= 128:
        raise ToolError(f"'{where}.id' must be a non-empty string", "messages")
    fn = raw.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ToolError(f"'{where}.function' must be an object with a 'name'", "messages")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            raise ToolError(f"'{where}.function.arguments' is not valid JSON", "messages") from None
    if not isinstance(args, dict):
        raise ToolError(f"'{where}.function.arguments' must be a JSON object", "messages")
    # NOTE: arguments as an object: Hugging Face templates print them with ``tojson``.
    return {"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": args}}


def tool_message_fields(msg: dict, i: int) -> dict:
    """The tool fields of ``messages[i]``, checked: merge them into the cleaned message."""
    role = msg.get("role")
    extra: dict = {}
    if role == "assistant" and msg.get("tool_calls") is not None:
        calls = msg["tool_calls"]
        if not isinstance(calls, list) or len(calls) > MAX_TOOL_CALLS_PER_MESSAGE:
            raise ToolError(
                f"'messages[{i}].tool_calls' must be a list of at most {MAX_TOOL_CALLS_PER_MESSAGE} calls", "messages"
            )
        if calls:
            extra["tool_calls"] = [_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
    elif msg.get("tool_calls") is not None:
        raise ToolError(f"'messages[{i}].tool_calls' is allowed only on assistant messages", "messages")
    if role == "tool":
        call_id = msg.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ToolError(f"'messages[{i}].tool_call_id' must name the call this message answers", "messages")
        extra["tool_call_id"] = call_id
        if isinstance(msg.get("name"), str):
            extra["name"] = msg["name"]
    return extra


def check_conversation(messages: list[dict]) -> list[dict]:
    """Every tool reply answers a call of an earlier assistant message (as OpenAI requires); fills in the
    replies' ``name`` from that call, which several templates print. Returns ``messages`` (changed in place)."""
    open_calls: dict[str, str] = {}
    for i, m in enumerate(messages):
        for call in m.get("tool_calls", ()):
            open_calls[call["id"]] = call["function"]["name"]
        if m["role"] == "tool":
            name = open_calls.get(m["tool_call_id"])
            if name is None:
                raise ToolError(
                    f"messages[{i}] (role tool) answers tool_call_id '{m['tool_call_id'][:64]}', "
                    "which no earlier assistant message called",
                    "messages",
                )
            m.setdefault("name", name)
    return messages
