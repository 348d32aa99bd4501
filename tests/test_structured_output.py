"""``response_format`` and ``grammar``: checked into one GBNF grammar or a 400 naming the field and keyword.

Grammars are held to documents with llama.cpp's own grammar engine and the demo model's vocabulary
(``tests.grammar_helpers.accepts``): valid instances pass, invalid ones do not.
"""

from __future__ import annotations

import json
from enum import Enum

import pytest
from pydantic import BaseModel, Field

from chatloop.coordinator.api_schema import RequestError
from chatloop.coordinator.structured_output import (
    UNCONSTRAINED,
    StructuredOutputError,
    parse_output_constraint,
    prefix_rules,
    schema_to_gbnf,
)
from chatloop.demo import demo_gguf
from chatloop.engine.tokenizer import Tokenizer
from tests.grammar_helpers import accepts


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(demo_gguf())
    yield t
    t.close()


class Color(str, Enum):
    red = "red"
    green = "green"


class Item(BaseModel):
    name: str
    qty: int


class Order(BaseModel):
    """What a pydantic model gives the openai SDK's ``parse`` ($defs, $ref, anyOf for Optional, enums)."""

    customer: str = Field(description="who ordered")
    color: Color
    items: list[Item]
    note: str | None = None


def _schema_format(schema: dict, name: str = "out") -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}}


def test_text_and_nothing_are_unconstrained():
    assert parse_output_constraint({}) is UNCONSTRAINED
    assert parse_output_constraint({"response_format": {"type": "text"}}) is UNCONSTRAINED


def test_json_object(tok):
    c = parse_output_constraint({"response_format": {"type": "json_object"}}, tok.vocab)
    assert c.kind == "json_object"
    assert accepts(tok, c.grammar, '{"a": [1, 2.5, "x", null, true], "b": {"c": {}}}')
    assert not accepts(tok, c.grammar, "[1, 2]")
    assert not accepts(tok, c.grammar, "```json\n{}\n```")


def test_json_object_with_schema_as_llama_server(tok):
    body = {
        "response_format": {
            "type": "json_object",
            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
        }
    }
    c = parse_output_constraint(body, tok.vocab)
    assert accepts(tok, c.grammar, '{"a": 3}') and not accepts(tok, c.grammar, '{"a": "3"}')


def test_pydantic_schema(tok):
    schema = Order.model_json_schema()
    c = parse_output_constraint(_schema_format(schema, "Order"), tok.vocab)
    assert c.kind == "json_schema" and c.name == "Order" and c.schema == schema
    good = {"customer": "Ann", "color": "red", "items": [{"name": "pen", "qty": 2}], "note": None}
    assert accepts(tok, c.grammar, json.dumps(good))
    assert accepts(tok, c.grammar, json.dumps({**good, "note": "fragile"}))
    assert not accepts(tok, c.grammar, json.dumps({**good, "color": "blue"}))  # enum
    assert not accepts(tok, c.grammar, json.dumps({k: v for k, v in good.items() if k != "items"}))  # required
    assert not accepts(tok, c.grammar, json.dumps({**good, "items": [{"name": "pen", "qty": "2"}]}))  # nested type


def test_nested_arrays_enums_patterns_lengths(tok):
    schema = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "code": {"type": "string", "pattern": "[A-Z]{2}-[0-9]+"},  # unanchored: anchored, stays valid
            "day": {"type": "string", "format": "date"},
            "short": {"type": "string", "minLength": 1, "maxLength": 3},
            "grid": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}, "minItems": 1},
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}], "items": False},
            "kind": {"type": ["string", "null"]},
            "flag": {"const": True},
        },
        "required": ["id", "code", "grid", "flag"],
        "additionalProperties": False,
    }
    g = parse_output_constraint(_schema_format(schema), tok.vocab).grammar
    base = {"id": "123e4567-e89b-12d3-a456-426614174000", "code": "AB-12", "grid": [[1, 2], []], "flag": True}
    assert accepts(tok, g, json.dumps(base))
    assert accepts(tok, g, json.dumps({**base, "day": "2024-02-29", "short": "abc", "pair": ["x", 1.5], "kind": None}))
    for bad in (
        {**base, "code": "ab-12"},
        {**base, "grid": []},
        {**base, "short": "abcd"},
        {**base, "day": "2024-13-01"},
        {**base, "extra": 1},
        {**base, "flag": False},
    ):
        assert not accepts(tok, g, json.dumps(bad)), bad


def test_strings_never_hold_raw_control_characters(tok):
    g = schema_to_gbnf({"type": "object", "properties": {"s": {"type": "string"}}})
    assert accepts(tok, g, '{"s": "a\\nb"}')
    assert not accepts(tok, g, '{"s": "a\nb"}')  # json.loads refuses a raw newline inside a string


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        ({"type": "object", "patternProperties": {"^x": {}}}, "schema.patternProperties"),
        ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}, "schema.properties.n.minimum"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "schema.uniqueItems"),
        ({"type": "object", "properties": {"e": {"type": "string", "format": "email"}}}, "schema.properties.e.format"),
        ({"not": {"type": "string"}}, "schema.not"),
        ({"if": {}, "then": {}}, "schema.if"),
        ({"$ref": "https://example.com/s.json"}, "schema.$ref"),
        ({"$ref": "#/$defs/Missing"}, "schema.$ref"),
        ({"anyOf": [{"type": "string"}], "properties": {}}, "schema.properties"),
        ({"type": ["string", "null"], "maxLength": 3}, "schema.maxLength"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "schema.required"),
        ({"type": "string", "maxLength": 100000}, "schema.maxLength"),
        ({"type": "string", "pattern": "^(?=a)b$"}, "schema.pattern"),
        ({"type": "array", "items": True}, "schema.items"),
        ({"type": "decimal"}, "schema.type"),
        ({"enum": []}, "schema.enum"),
    ],
)
def test_unsupported_keywords_name_their_path(schema, param):
    with pytest.raises(StructuredOutputError) as err:
        parse_output_constraint(_schema_format(schema))
    assert err.value.param == "response_format.json_schema." + param
    assert isinstance(err.value, RequestError) and err.value.status == 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}}},
            "response_format.json_schema.strict",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [], "x": 1}}},
            "response_format.json_schema.x",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_object", "strict": True}}, "response_format.strict"),
        ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "grammar"),
        ({"grammar": 42}, "grammar"),
        ({"grammar": 'root ::= "a'}, "grammar"),
        ({"grammar": "root ::= undefined-rule"}, "grammar"),
    ],
)
def test_bad_fields_name_the_field(body, param):
    with pytest.raises(StructuredOutputError) as err:
        parse_output_constraint(body)
    assert err.value.param == param, str(err.value)


def test_grammar_field(tok):
    c = parse_output_constraint({"grammar": 'root ::= "yes" | "no"'}, tok.vocab)
    assert c.kind == "grammar" and accepts(tok, c.grammar, "no") and not accepts(tok, c.grammar, "maybe")
    with pytest.raises(StructuredOutputError, match="unexpected end of input"):
        parse_output_constraint({"grammar": 'root ::= "yes'}, tok.vocab)


def test_json_schema_without_schema_is_any_object(tok):
    c = parse_output_constraint({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, tok.vocab)
    assert accepts(tok, c.grammar, '{"k": 1}') and not accepts(tok, c.grammar, "1")


def test_recursive_refs(tok):
    schema = {
        "$defs": {
            "node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
        },
        "$ref": "#/$defs/node",
    }
    g = parse_output_constraint(_schema_format(schema), tok.vocab).grammar
    assert accepts(tok, g, '{"kids": [{"kids": []}, {}]}')


def test_prefix_rules_leaves_literals_alone(tok):
    g = schema_to_gbnf({"type": "object", "properties": {"root": {"const": "root ::= x"}}, "required": ["root"]})
    p = prefix_rules(g, "t0-")
    assert "t0-root ::=" in p and "root ::= x" in p
    assert accepts(tok, p + "\nroot ::= t0-root", '{"root": "root ::= x"}')
