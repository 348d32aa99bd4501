"""``response_format`` and llama-server's ``grammar`` field, checked and turned into one GBNF grammar (or None).

- ``{"type": "text"}`` or nothing: no grammar.
- ``{"type": "json_object"}``: any JSON object (llama-server's ``"schema"`` beside it narrows it, as there).
- ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``: JSON valid under the
  schema, converted to GBNF by llama-cpp-python's maintained converter (``llama_cpp.llama_grammar``);
  ``chatloop.coordinator.json_schema_check`` refuses the keywords it would not enforce.
- ``"grammar": "<GBNF>"``: the user's own grammar, root rule ``root``.

Every grammar is then built by llama.cpp's own parser (``chatloop.engine.grammar.check_grammar``) against the
vocabulary, so a bad one is a 400 here, before anything is admitted, and never a failure in the last stage.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass

from llama_cpp.llama_grammar import SchemaConverter

from chatloop.coordinator.api_schema import RequestError
from chatloop.coordinator.json_schema_check import SchemaError, anchored, check_schema
from chatloop.engine.grammar import GrammarError, check_grammar

log = logging.getLogger(__name__)

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_RESPONSE_FORMAT_KEYS = {"text": {"type"}, "json_object": {"type", "schema"}, "json_schema": {"type", "json_schema"}}
_JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}


class StructuredOutputError(RequestError):
    """A 400 naming the request field at fault, e.g. ``response_format.json_schema.schema.patternProperties``."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param)


@dataclass(frozen=True)
class OutputConstraint:
    kind: str  # text | json_object | json_schema | grammar
    grammar: str | None  # GBNF with root rule "root"; None = unconstrained
    schema: dict | None = None  # the JSON schema (json_object with a schema, json_schema)
    name: str | None = None  # json_schema.name


UNCONSTRAINED = OutputConstraint("text", None)


def schema_to_gbnf(schema: dict, param: str = "schema") -> str:
    """GBNF for JSON valid under ``schema`` (checked first: StructuredOutputError names what is unsupported)."""
    try:
        check_schema(schema, param)
    except SchemaError as exc:
        raise StructuredOutputError(str(exc), exc.path) from None
    schema = _inline_root_ref(_anchor_patterns(copy.deepcopy(schema)))
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(schema, "input")
        converter.visit(resolved, "")
        gbnf = converter.format_grammar()
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        # The checks above should leave nothing the converter trips on; if it still does, say so plainly.
        raise StructuredOutputError(
            f"the schema could not be converted to a grammar: {str(exc)[:200]}", param
        ) from None
    # NOTE: the converter's string characters admit raw control characters (llama.cpp's own converter excludes
    # them): JSON forbids them inside strings, so a model writing a raw newline would produce invalid JSON.
    return _STRING_CHAR.sub(lambda _: _JSON_CHAR, gbnf)


_STRING_CHAR = re.compile(r'^char ::= \[\^"\\\\\] \|', re.MULTILINE)
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


def prefix_rules(gbnf: str, prefix: str) -> str:
    """``gbnf`` with every rule it defines renamed ``prefix + name`` (so that grammars converted separately
    can share one file without their rules colliding). Literals, character classes and comments are kept."""
    defined = set(_RULE_NAME.findall(gbnf))
    out: list[str] = []
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and gbnf[j] != close:
                j += 2 if gbnf[j] == "\\" else 1
            out.append(gbnf[i : j + 1])
            i = j + 1
        elif c == "{":  # repetition counts {m,n}
            j = gbnf.index("}", i)
            out.append(gbnf[i : j + 1])
            i = j + 1
        elif c == "#":
            j = gbnf.find("\n", i)
            j = n if j < 0 else j
            out.append(gbnf[i:j])
            i = j
        elif c.isalnum() or c == "-":
            j = i
            while j < n and (gbnf[j].isalnum() or gbnf[j] == "-"):
                j += 1
            word = gbnf[i:j]
            out.append(prefix + word if word in defined else word)
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


_RULE_NAME = re.compile(r"^([a-zA-Z0-9-]+) ::=", re.MULTILINE)


def _inline_root_ref(schema: dict) -> dict:
    """The converter's ``resolve_refs`` does not descend into a schema that is a ``$ref``, so with a ``$ref`` at
    the root (pydantic's recursive models) the references inside ``$defs`` stay unresolved: put the target in
    place of the root reference, keeping the definitions."""
    for _ in range(8):  # a root reference to a reference, ... (the checker has ensured they resolve)
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        target = schema
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        schema = {**{k: v for k, v in target.items() if k not in defs}, **defs}
    return schema


def _anchor_patterns(node):
    if isinstance(node, dict):
        out = {k: _anchor_patterns(v) for k, v in node.items()}
        if isinstance(out.get("pattern"), str):
            out["pattern"] = anchored(out["pattern"])
        return out
    if isinstance(node, list):
        return [_anchor_patterns(v) for v in node]
    return node


def _checked(gbnf: str, vocab, param: str) -> str:
    try:
        check_grammar(gbnf, vocab)
    except GrammarError as exc:
        raise StructuredOutputError(str(exc), param) from None
    return gbnf


def parse_output_constraint(body: dict, vocab=None) -> OutputConstraint:
    """The output constraint a request asks for. ``vocab``: the coordinator's ``Tokenizer.vocab`` (lets
    grammars name tokens as ``<|im_end|>`` or ``<[123]>``); without it such references are refused."""
    fmt = body.get("response_format")
    grammar = body.get("grammar")
    if grammar is not None and not isinstance(grammar, str):
        raise StructuredOutputError("'grammar' must be a string of GBNF rules", "grammar")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text" and set(fmt) <= {"type"}):
        if grammar:
            return OutputConstraint("grammar", _checked(grammar, vocab, "grammar"))
        return UNCONSTRAINED
    if not isinstance(fmt, dict):
        raise StructuredOutputError("'response_format' must be an object with a 'type'", "response_format")
    kind = fmt.get("type")
    if kind not in _RESPONSE_FORMAT_KEYS:
        raise StructuredOutputError(
            f"'response_format.type' must be one of {', '.join(_RESPONSE_FORMAT_KEYS)}", "response_format.type"
        )
    unknown = sorted(set(fmt) - _RESPONSE_FORMAT_KEYS[kind])
    if unknown:
        raise StructuredOutputError(
            f"'response_format' of type {kind} takes no '{unknown[0]}'", f"response_format.{unknown[0]}"
        )
    if grammar:
        raise StructuredOutputError("give either 'grammar' or a JSON 'response_format', not both", "grammar")
    if kind == "json_object":
        schema = fmt.get("schema")
        if schema is None:
            return OutputConstraint(
                "json_object", _checked(schema_to_gbnf({"type": "object"}), vocab, "response_format")
            )
        gbnf = schema_to_gbnf(schema, "response_format.schema")
        return OutputConstraint("json_object", _checked(gbnf, vocab, "response_format.schema"), schema=schema)
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise StructuredOutputError(
            "'response_format.json_schema' must be an object with 'name' and 'schema'", "response_format.json_schema"
        )
    unknown = sorted(set(spec) - _JSON_SCHEMA_KEYS)
    if unknown:
        raise StructuredOutputError(
            f"'response_format.json_schema' takes no '{unknown[0]}'", f"response_format.json_schema.{unknown[0]}"
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise StructuredOutputError(
            "'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-'",
            "response_format.json_schema.name",
        )
    if spec.get("strict") not in (None, True, False):
        raise StructuredOutputError(
            "'response_format.json_schema.strict' must be true or false", "response_format.json_schema.strict"
        )
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise StructuredOutputError(
            "'response_format.json_schema.description' must be a string", "response_format.json_schema.description"
        )
    schema = spec.get("schema")
    if schema is None:
        # OpenAI lets the schema out; the only honest reading is "some JSON object".
        gbnf = schema_to_gbnf({"type": "object"})
        return OutputConstraint("json_schema", _checked(gbnf, vocab, "response_format.json_schema"), name=name)
    param = "response_format.json_schema.schema"
    gbnf = schema_to_gbnf(schema, param)
    log.debug("json_schema %s: %d rules of GBNF", name, gbnf.count("::="))
    return OutputConstraint("json_schema", _checked(gbnf, vocab, param), schema=schema, name=name)


def describe(constraint: OutputConstraint) -> str:
    """One line for logs: the kind and the size of the grammar."""
    if constraint.grammar is None:
        return constraint.kind
    return f"{constraint.kind} ({len(constraint.grammar)} chars of GBNF)"
