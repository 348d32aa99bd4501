"""Tools: request checks, rendering through real chat templates (SmolLM2's from the demo GGUF: no tools, so
the generic format; a Qwen2.5-style template: its own ``<tool_call>`` syntax), output parsers per family, the
streaming parser against the whole-reply parser, and the grammars for ``required`` and named functions, held
to example replies with llama.cpp's grammar engine."""

from __future__ import annotations

import json
import re

import pytest

from chatloop.coordinator.chat_template import ChatTemplate
from chatloop.coordinator.tool_calls import (
    ToolError,
    check_conversation,
    parse_tool_request,
    tool_message_fields,
)
from chatloop.coordinator.tool_grammar import tool_grammar
from chatloop.coordinator.tool_parsers import ToolCallStream, parse_reply
from chatloop.coordinator.tool_prompt import probe, render_chat
from chatloop.demo import demo_gguf
from chatloop.engine.grammar import check_grammar
from chatloop.engine.tokenizer import Tokenizer
from tests.grammar_helpers import accepts

# The shape of Qwen2.5-Instruct's template (tools in the system turn, <tool_call> blocks, <tool_response>).
QWEN_TOOLS_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
USER = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {
    "id": "call_abc",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
}


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(demo_gguf())
    yield t
    t.close()


@pytest.fixture(scope="module")
def smol(tok) -> ChatTemplate:
    return ChatTemplate.from_tokenizer(tok)


@pytest.fixture(scope="module")
def qwen() -> ChatTemplate:
    return ChatTemplate(QWEN_TOOLS_TEMPLATE, "", "<|im_end|>")


def _req(**body):
    return parse_tool_request({"tools": [WEATHER, TIME], **body})


def _history() -> list[dict]:
    """An agent loop's second turn: question, the assistant's call, the tool's answer."""
    raw = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 C, sunny"},
    ]
    msgs = []
    for i, m in enumerate(raw):
        msgs.append({"role": m["role"], "content": m.get("content") or "", **tool_message_fields(m, i)})
    return check_conversation(msgs)


# -- request checks ------------------------------------------------------------------------------------


def test_tool_request():
    assert parse_tool_request({}) is None
    r = _req()
    assert r.choice == "auto" and not r.parallel and [t.name for t in r.tools] == ["get_weather", "get_time"]
    r = _req(tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False)
    assert r.choice == "function" and [t.name for t in r.allowed()] == ["get_time"] and not r.parallel
    assert _req(tool_choice="none").allowed() == ()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": "x"}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "minProperties": 1}},
                    }
                ]
            },
            "tools[0].function.parameters.minProperties",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_bad_tool_fields(body, param):
    with pytest.raises(ToolError) as err:
        parse_tool_request(body)
    assert err.value.param == param and err.value.status == 400, str(err.value)


def test_messages_with_tool_calls():
    msgs = _history()
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "celsius"}
    assert msgs[2]["name"] == "get_weather" and msgs[2]["tool_call_id"] == "call_abc"
    bad_args = {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{oops"}}]}
    with pytest.raises(ToolError, match=r"messages\[1\].tool_calls\[0\].function.arguments"):
        tool_message_fields(bad_args, 1)
    with pytest.raises(ToolError, match="tool_call_id"):
        tool_message_fields({"role": "tool", "content": "x"}, 2)
    with pytest.raises(ToolError, match="only on assistant"):
        tool_message_fields({"role": "user", "tool_calls": []}, 0)
    orphan = [{"role": "user", "content": "q"}, {"role": "tool", "content": "r", "tool_call_id": "call_zzz"}]
    with pytest.raises(ToolError, match="no earlier assistant message called"):
        check_conversation(orphan)


# -- rendering -----------------------------------------------------------------------------------------


def test_probe(smol, qwen):
    assert probe(smol).family == "generic" and not probe(smol).tools
    caps = probe(qwen)
    assert caps.tools and caps.calls and caps.family == "hermes"


def test_qwen_template_renders_tools_calls_and_replies(qwen):
    caps = probe(qwen)
    out = render_chat(qwen, caps, _history(), _req())
    assert out.format == "hermes"
    assert '"name": "get_weather"' in out.prompt and "<tools>" in out.prompt
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
        in out.prompt
    )
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in out.prompt
    assert out.prompt.endswith("<|im_start|>assistant\n")
    named = render_chat(qwen, caps, [USER], _req(tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert "get_time" in named.prompt and "get_weather" not in named.prompt
    none = render_chat(qwen, caps, [USER], _req(tool_choice="none"))
    assert "<tools>" not in none.prompt


def test_smollm2_template_gets_the_generic_format(smol, tok):
    caps = probe(smol)
    out = render_chat(smol, caps, _history(), _req(parallel_tool_calls=False))
    assert out.format == "generic"
    assert out.prompt.startswith("<|im_start|>system\nYou can call the following tools")
    assert '"name": "get_weather"' in out.prompt and '{"response": "<your reply>"}' in out.prompt
    assert '<|im_start|>assistant\n{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"' in out.prompt
    assert (
        '<|im_start|>user\n{"tool_response": {"tool": "get_weather", "tool_call_id": "call_abc", "content": "18 C, sunny"}}'
        in out.prompt
    )
    plain = render_chat(smol, caps, [USER], None)
    assert plain.prompt == smol.render([USER])  # no tools: exactly as before
    assert len(tok.tokenize(out.prompt)) < 1000


# -- parsing -------------------------------------------------------------------------------------------


def _args(call: dict) -> dict:
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call["id"]) and call["type"] == "function"
    return json.loads(call["function"]["arguments"])


def test_parse_hermes():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    r = parse_reply(text, "hermes", _req())
    assert r.content == "Let me check." and r.finish_reason == "tool_calls"
    assert [c["function"]["name"] for c in r.tool_calls] == ["get_weather", "get_time"]
    assert _args(r.tool_calls[1]) == {"zone": "CET"}
    assert parse_reply('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', "hermes", _req()).tool_calls == []
    assert parse_reply(text, "hermes", _req(tool_choice="none")).content == text


def test_parse_llama3():
    r = parse_reply('{"name": "get_time", "parameters": {"zone": "UTC"}}', "llama3", _req())
    assert r.content is None and _args(r.tool_calls[0]) == {"zone": "UTC"}
    r = parse_reply(
        '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
        "llama3",
        _req(),
    )
    assert len(r.tool_calls) == 2
    assert parse_reply("{curly} prose", "llama3", _req()).content == "{curly} prose"


def test_parse_mistral():
    r = parse_reply(
        '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}, "id": "a1b2c3d4e"}]', "mistral", _req()
    )
    assert r.tool_calls[0]["id"] == "a1b2c3d4e" and json.loads(r.tool_calls[0]["function"]["arguments"]) == {
        "zone": "UTC"
    }
    r = parse_reply('Sure.[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}', "mistral", _req())
    assert r.content == "Sure." and _args(r.tool_calls[0]) == {"zone": "UTC"}


def test_parse_generic():
    r = parse_reply('{"tool_call": {"name": "get_time", "arguments": {"zone": "UTC"}}}', "generic", _req())
    assert _args(r.tool_calls[0]) == {"zone": "UTC"}
    r = parse_reply(
        '{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}, "id": "abcd"}]}', "generic", _req()
    )
    assert len(r.tool_calls) == 1
    assert parse_reply('{"response": "It is sunny."}', "generic", _req()).content == "It is sunny."
    assert parse_reply("plain words", "generic", _req()).content == "plain words"


# -- streaming -----------------------------------------------------------------------------------------

STREAM_CASES = [
    (
        "hermes",
        'Checking <b>now</b>.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n</tool_call>',
    ),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a tag."),
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}'),  # no closing tag before the end
    ("llama3", '{"name": "get_time", "parameters": {"zone": "UTC"}}'),
    ("llama3", "Plain answer with {braces} later."),
    ("mistral", 'Okay.[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}, "id": "abcdefghi"}]'),
    ("generic", '{"response": "Line one,\\nline \\"two\\" \\u00e9\\ud83d\\ude00 end."}'),
    ("generic", '{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}, "id": "abcd"}]}'),
]


@pytest.mark.parametrize(("fmt", "text"), STREAM_CASES)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_stream_matches_whole_reply(fmt, text, step):
    req = _req()
    whole = parse_reply(text, fmt, req)
    stream = ToolCallStream(fmt, req)
    deltas = []
    for i in range(0, len(text), step):
        deltas += stream.feed(text[i : i + step])
    rest, called = stream.finish()
    deltas += rest
    content = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", ())]
    assert called == bool(whole.tool_calls)
    assert content.strip() == (whole.content or "").strip()
    assert [c["index"] for c in calls] == list(range(len(calls)))
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole.tool_calls
    ]


def test_stream_sends_content_before_the_call_arrives():
    stream = ToolCallStream("hermes", _req())
    assert stream.feed("Hello there") == [{"content": "Hello there"}]
    assert stream.feed(" <tool") == [{"content": " "}]  # "<tool" may open a call: held back
    assert stream.feed("_call>\n{") == []


# -- grammars ------------------------------------------------------------------------------------------

GRAMMAR_CASES = {
    "hermes": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ),
    "llama3": (
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        '{"name": "get_weather", "parameters": {"town": "Paris", "unit": "celsius"}}',
    ),
    "mistral": (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, "id": "abcdefghi"}]',
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}, "id": "abcdefghi"}]',
    ),
    "generic": (
        '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}',
        '{"tool_call": {"name": "get_rain", "arguments": {}}}',
    ),
}


@pytest.mark.parametrize("fmt", sorted(GRAMMAR_CASES))
def test_required_grammar_is_a_valid_call(tok, fmt):
    good, bad = GRAMMAR_CASES[fmt]
    g = tool_grammar(_req(tool_choice="required", parallel_tool_calls=False), fmt)
    assert g.trigger_patterns == ()
    check_grammar(g.gbnf, tok.vocab)
    assert accepts(tok, g.gbnf, good)
    assert not accepts(tok, g.gbnf, bad)
    assert not accepts(tok, g.gbnf, "The weather is nice.")
    assert parse_reply(good, fmt, _req()).tool_calls  # what the grammar lets through, the parser reads


def test_named_function_grammar(tok):
    req = _req(tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False)
    g = tool_grammar(req, "generic").gbnf
    assert accepts(tok, g, '{"tool_call": {"name": "get_time", "arguments": {"zone": "UTC"}}}')
    assert not accepts(
        tok, g, '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}'
    )
    assert not accepts(tok, g, '{"response": "hi"}')


def test_parallel_calls_grammar(tok):
    g = tool_grammar(_req(tool_choice="required", parallel_tool_calls=True), "hermes").gbnf
    two = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    assert accepts(tok, g, two)
    g = tool_grammar(_req(tool_choice="required", parallel_tool_calls=True), "generic").gbnf
    assert accepts(tok, g, '{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}, "id": "abcd"}]}')


def test_auto_grammars(tok):
    generic = tool_grammar(_req(), "generic")
    assert generic.trigger_patterns == ()  # the generic reply is always JSON: response or call
    assert accepts(tok, generic.gbnf, '{"response": "It is sunny in Paris."}')
    hermes = tool_grammar(_req(), "hermes")
    assert hermes.trigger_patterns  # lazy: prose is free, a call once started is constrained
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    assert accepts(tok, hermes.gbnf, "Some prose first. " + call, hermes.trigger_patterns)
    assert not accepts(tok, hermes.gbnf, 'Prose. <tool_call>\n{"name": "rm_rf"', hermes.trigger_patterns)
    assert tool_grammar(_req(tool_choice="none"), "hermes") is None


def test_tools_with_equal_def_names_do_not_collide(tok):
    def tool(name: str, inner: dict) -> dict:
        params = {
            "type": "object",
            "$defs": {"Arg": inner},
            "properties": {"a": {"$ref": "#/$defs/Arg"}},
            "required": ["a"],
        }
        return {"type": "function", "function": {"name": name, "parameters": params}}

    req = parse_tool_request(
        {
            "tools": [tool("f", {"type": "integer"}), tool("g", {"type": "string"})],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        }
    )
    g = tool_grammar(req, "generic").gbnf
    assert accepts(tok, g, '{"tool_call": {"name": "f", "arguments": {"a": 1}}}')
    assert accepts(tok, g, '{"tool_call": {"name": "g", "arguments": {"a": "x"}}}')
    assert not accepts(tok, g, '{"tool_call": {"name": "g", "arguments": {"a": 1}}}')


def test_generic_format_without_a_system_turn():
    strict = ChatTemplate(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    )
    caps = probe(strict)
    out = render_chat(strict, caps, [USER], _req(tool_choice="required"))
    assert out.format == "generic" and out.prompt.startswith("[user]You can call the following tools")
    assert out.prompt.endswith("What is the weather in Paris?[assistant]")
