"""Grammars that make a reply a valid call of a declared tool, in the syntax of the model's family.

Each tool's call object (name fixed, arguments per the tool's JSON schema) is converted separately by the
JSON-schema converter and its rules prefixed ``t<i>-``, so equal ``$defs`` names of two tools cannot collide;
``call`` is the choice between them. Per format:

- hermes (Qwen2.5/Qwen3/Hermes): ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``, repeated
  when parallel calls are allowed;
- llama3: ``{"name": ..., "parameters": ...}`` (Llama 3.1/3.2 JSON tool calling; one call);
- mistral: ``[TOOL_CALLS][{"name": ..., "arguments": ..., "id": "<9 letters or digits>"}, ...]``;
- generic: ``{"tool_call": {...}}`` or ``{"tool_calls": [{..., "id"?: ...}, ...]}``, and with ``auto`` also
  ``{"response": "..."}``.

``required`` and a named function constrain the whole reply. ``auto`` uses a lazy grammar for the families
with a call marker (as llama-server does): text is free until the marker, the call after it is constrained.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatloop.coordinator.structured_output import prefix_rules, schema_to_gbnf
from chatloop.coordinator.tool_calls import ToolRequest

_ARGS_KEY = {"hermes": "arguments", "llama3": "parameters", "mistral": "arguments", "generic": "arguments"}
# Where a lazy grammar starts: the first match group of a pattern over the generated text (llama.h).
_TRIGGERS = {
    "hermes": (r"[\s\S]*?(<tool_call>)[\s\S]*",),
    "mistral": (r"[\s\S]*?(\[TOOL_CALLS\])[\s\S]*",),
    "llama3": (r"\s*(\{\s*\"name\"\s*:)[\s\S]*",),
}
# JSON strings as the converter writes them, without raw control characters (JSON forbids them).
_SHARED = r"""space ::= " "?
json-char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])
json-string ::= "\"" json-char* "\"" space
"""


@dataclass(frozen=True)
class ToolGrammar:
    gbnf: str  # root rule "root"
    trigger_patterns: tuple[str, ...] = ()  # non-empty: lazy, free text until one matches


def _rebased(node, base: str):
    """``node`` with its local references made relative to ``base`` (where it sits in the call schema)."""
    if isinstance(node, dict):
        out = {k: _rebased(v, base) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            out["$ref"] = base + ref[1:]
        return out
    if isinstance(node, list):
        return [_rebased(v, base) for v in node]
    return node


def _call_schema(tool, fmt: str, with_id: bool) -> dict:
    args = _rebased(tool.parameters, f"#/properties/{_ARGS_KEY[fmt]}")
    props: dict = {"name": {"const": tool.name}, _ARGS_KEY[fmt]: args}
    required = ["name", _ARGS_KEY[fmt]]
    if fmt == "mistral":
        props["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
        required.append("id")
    elif with_id:
        # NOTE: optional and short: the reply's ids are replaced by fresh ones (tool_parsers), and a small model
        # asked for an id writes digits until the length limit (seen with SmolLM2: 64 of them).
        props["id"] = {"type": "string", "minLength": 1, "maxLength": 32}
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def tool_grammar(req: ToolRequest, fmt: str) -> ToolGrammar | None:
    """The grammar for a reply to ``req`` in format ``fmt``; None when the reply is free (``none``)."""
    if req.choice == "none":
        return None
    tools = req.allowed()
    many = req.parallel
    parts = [_SHARED]
    alts = []
    for i, tool in enumerate(tools):
        schema = _call_schema(tool, fmt, with_id=fmt == "generic" and many)
        gbnf = schema_to_gbnf(schema, f"tools[{req.tools.index(tool)}].function.parameters")
        parts.append(prefix_rules(gbnf, f"t{i}-"))
        alts.append(f"t{i}-root")
    parts.append("call ::= " + " | ".join(alts))
    if fmt == "hermes":
        block = '"<tool_call>\\n" call "\\n</tool_call>"'
        root = f'{block} ("\\n" {block})*' if many else block
    elif fmt == "llama3":
        root = "call"
    elif fmt == "mistral":
        root = '"[TOOL_CALLS]" "[" call ("," space call)* "]"' if many else '"[TOOL_CALLS]" "[" call "]"'
    else:
        if many:
            root = '"{" space "\\"tool_calls\\"" space ":" space "[" space call ("," space call)* "]" space "}" space'
        else:
            root = '"{" space "\\"tool_call\\"" space ":" space call "}" space'
        if req.choice == "auto":
            root += ' | "{" space "\\"response\\"" space ":" space json-string "}" space'
    parts.append(f"root ::= {root}")
    lazy = req.choice == "auto" and fmt != "generic"
    return ToolGrammar("\n".join(parts), _TRIGGERS[fmt] if lazy else ())
