"""Structured output and tool calls served end to end (real stage and coordinator processes, real llama.cpp):
the ``openai`` client's ``parse`` with pydantic models, JSON schemas validated with ``jsonschema``, streamed
against whole replies, tool calls on the demo model (generic format) and on a random-weight Qwen2-style model
whose template knows tools (``<tool_call>`` syntax), 400s before admission, 2 and 3 stages, the prefix cache,
and a failover in the middle of a constrained generation."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request
from enum import Enum
from typing import Literal

import aiohttp
import jsonschema
import pytest
from pydantic import BaseModel, Field

from chatloop.demo import demo_gguf, demo_model_dir
from converters.convert import ConvertRequest, convert
from tests.cluster_harness import Cluster, http_json
from tests.hf_fixtures import write_tiny_model
from tests.sse import sse_events
from tests.test_tool_calls import QWEN_TOOLS_TEMPLATE

openai = pytest.importorskip("openai")

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "vip": {"type": "boolean"},
            },
            "required": ["name", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "qty": {"type": "integer"},
                    "color": {"enum": ["red", "green", "blue"]},
                },
                "required": ["sku", "qty", "color"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 2,
        },
        "status": {"enum": ["new", "paid", "shipped"]},
        "note": {"type": "string", "maxLength": 16},
    },
    "required": ["customer", "items", "status"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two whole numbers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer"},
                "b": {"type": "integer"},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TOOL_PROMPTS = [
    "What is the weather in Paris?",
    "How much is 12 plus 30?",
    "Is it raining in Rome right now?",
    "Add 7 and 5 for me.",
]


class Mood(str, Enum):
    happy = "happy"
    sad = "sad"
    neutral = "neutral"


class Review(BaseModel):
    title: str = Field(max_length=24)
    stars: Literal[1, 2, 3, 4, 5]
    mood: Mood
    tags: list[str] = Field(max_length=2)


PARSE_PROMPTS = [
    "Review the movie Titanic.",
    "Review a pizza restaurant in Naples.",
    "Review your last holiday at the sea.",
    "Review the book Moby Dick.",
    "Review a cheap pair of headphones.",
    "Review a rainy day in London.",
    "Review the game of chess.",
    "Review a cup of coffee.",
    "Review a long train journey.",
    "Review a new smartphone.",
]


# -- clusters ------------------------------------------------------------------------------------------

# These clusters are not about failure detection: on a shared, busy machine a stage may answer a probe late.
PATIENT = {"failure_threshold": 6, "connect_timeout_secs": 5.0, "step_timeout_secs": 60.0}


@pytest.fixture(scope="module")
def cluster2(module_procs, tmp_path_factory) -> Cluster:
    return Cluster(module_procs, demo_model_dir(2), tmp_path_factory.mktemp("s2"), coordinator_extra=PATIENT).start()


@pytest.fixture(scope="module")
def cluster3(module_procs, tmp_path_factory) -> Cluster:
    out = tmp_path_factory.mktemp("smol3")
    convert(ConvertRequest(source=str(demo_gguf()), out=out, layers="0:7,7:19,19:30"))
    return Cluster(module_procs, out, tmp_path_factory.mktemp("s3"), coordinator_extra=PATIENT).start()


@pytest.fixture(scope="module")
def qwen_cluster(module_procs, tmp_path_factory) -> Cluster:
    """A random-weight Qwen2-style model whose chat template renders tools and writes ``<tool_call>`` blocks."""
    folder = write_tiny_model(tmp_path_factory.mktemp("qwen-hf") / "qwen2", "qwen2")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = QWEN_TOOLS_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path_factory.mktemp("qwen-out")
    convert(ConvertRequest(source=str(folder), out=out, stages=2))
    return Cluster(module_procs, out, tmp_path_factory.mktemp("sq"), coordinator_extra=PATIENT).start()


def _chat(cluster: Cluster, body: dict) -> dict:
    status, out = http_json(f"{cluster.url}/v1/chat/completions", {"temperature": 0, **body}, timeout=120)
    assert status == 200, out
    return out


def _sse(cluster: Cluster, body: dict) -> list[dict]:
    body = {"temperature": 0, **body, "stream": True}
    req = urllib.request.Request(
        f"{cluster.url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert not any("error" in e for e in events), events
    return events


def _streamed(events: list[dict]) -> tuple[str, list[dict], str | None]:
    """The content, the tool calls (accumulated as the openai SDK does) and the finish reason of a stream."""
    text, calls, finish = [], {}, None
    for e in events:
        for choice in e.get("choices", ()):
            delta = choice["delta"]
            text.append(delta.get("content") or "")
            for c in delta.get("tool_calls") or ():
                acc = calls.setdefault(c["index"], {"id": None, "name": "", "arguments": ""})
                acc["id"] = c.get("id") or acc["id"]
                acc["name"] += c.get("function", {}).get("name") or ""
                acc["arguments"] += c.get("function", {}).get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return "".join(text), [calls[k] for k in sorted(calls)], finish


def _json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "order", "schema": schema, "strict": True}}


def _assert_valid_calls(message: dict, allowed: set[str]) -> list[dict]:
    calls = message.get("tool_calls")
    assert calls, message
    for call in calls:
        assert call["type"] == "function" and re.fullmatch(r"call_[A-Za-z0-9]{24}", call["id"]), call
        assert call["function"]["name"] in allowed, call
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    return calls


def _prompt_tokens_counted(cluster: Cluster) -> float:
    with urllib.request.urlopen(f"{cluster.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(r"^inference_prompt_tokens_total\{[^}]*\} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


# -- structured output ---------------------------------------------------------------------------------


def test_openai_parse_with_pydantic_models(cluster2):
    client = openai.OpenAI(base_url=f"{cluster2.url}/v1", api_key="unused")
    for prompt in PARSE_PROMPTS:
        got = client.chat.completions.parse(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": prompt}],
            response_format=Review,
            max_tokens=120,
            temperature=0,
        )
        review = got.choices[0].message.parsed
        assert isinstance(review, Review), (prompt, got.choices[0].message.content)


@pytest.mark.parametrize("which", ["cluster2", "cluster3"])
def test_json_schema_validates_and_streams_the_same(which, request):
    cluster = request.getfixturevalue(which)
    for prompt in ("Make an order for two red shirts.", "Alice bought a lamp.", "Write an order."):
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "response_format": _json_format(ORDER_SCHEMA),
            "max_tokens": 160,
        }
        out = _chat(cluster, body)
        choice = out["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), ORDER_SCHEMA)
        text, calls, finish = _streamed(_sse(cluster, body))
        assert (text, calls, finish) == (choice["message"]["content"], [], "stop")


def test_json_object_and_user_grammar(cluster2):
    out = _chat(
        cluster2,
        {
            "messages": [{"role": "user", "content": "Describe a cat as JSON."}],
            "response_format": {"type": "json_object"},
            "max_tokens": 200,
        },
    )
    if out["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)
    else:  # a free-form object may run past max_tokens: it is still a JSON object so far
        assert out["choices"][0]["message"]["content"].lstrip().startswith("{")
    out = _chat(
        cluster2,
        {
            "messages": [{"role": "user", "content": "Yes or no?"}],
            "grammar": 'root ::= ("yes" | "no") "."',
            "max_tokens": 8,
        },
    )
    assert out["choices"][0]["message"]["content"] in ("yes.", "no.")
    status, out = http_json(
        f"{cluster2.url}/v1/completions",
        {"prompt": "The answer is", "grammar": 'root ::= " " [0-9]{1,3}', "max_tokens": 8, "temperature": 0},
    )
    assert status == 200 and re.fullmatch(r" [0-9]{1,3}", out["choices"][0]["text"]), out


def test_prefix_cache_with_a_grammar(cluster2):
    body = {
        "messages": [{"role": "system", "content": "You write orders. " * 20}, {"role": "user", "content": "Bob."}],
        "response_format": _json_format(ORDER_SCHEMA),
        "max_tokens": 160,
    }
    first = _chat(cluster2, body)
    second = _chat(cluster2, body)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, second["usage"]
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    jsonschema.validate(json.loads(second["choices"][0]["message"]["content"]), ORDER_SCHEMA)


def test_unconstrained_greedy_output_unchanged(cluster2):
    """Tools with ``none`` and a ``text`` response_format leave the prompt and the sampling as they were."""
    plain = {"messages": [{"role": "user", "content": TOOL_PROMPTS[0]}], "max_tokens": 24}
    want = _chat(cluster2, plain)["choices"][0]["message"]
    for extra in ({"tools": TOOLS, "tool_choice": "none"}, {"response_format": {"type": "text"}}):
        got = _chat(cluster2, {**plain, **extra})["choices"][0]
        assert got["message"] == want
        assert got["finish_reason"] != "tool_calls"


# -- bad requests --------------------------------------------------------------------------------------


BAD = [
    ({"response_format": _json_format({"type": "object", "patternProperties": {"^a": {}}})}, "patternProperties"),
    # llama-cpp-python's converter does not enforce number ranges: refused, not ignored
    (
        {"response_format": _json_format({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}})},
        "minimum",
    ),
    ({"response_format": _json_format({"type": "nonsense"})}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"grammar": "root ::= ( "}, "grammar"),
    ({"grammar": 'root ::= other "x"'}, "grammar"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"n": 2}, "n"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"logit_bias": {"4000000": 1}}, "logit_bias"),
    ({"functions": [{"name": "f"}]}, "functions"),
]


@pytest.mark.parametrize("extra,param", BAD)
def test_bad_requests_get_400_and_nothing_is_admitted(cluster2, extra, param):
    before = _prompt_tokens_counted(cluster2)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    status, out = http_json(f"{cluster2.url}/v1/chat/completions", body)
    assert status == 400, out
    assert param in (out["error"]["param"] or ""), out
    assert _prompt_tokens_counted(cluster2) == before


def test_tools_on_completions_get_400(cluster2):
    body = {"prompt": "Hi", "max_tokens": 2, "tools": TOOLS}
    status, out = http_json(f"{cluster2.url}/v1/completions", body)
    assert status == 400 and out["error"]["param"] == "tools", out


# -- tool calls ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["cluster2", "qwen_cluster"])
def test_required_and_named_tool_calls_are_valid(which, request):
    cluster = request.getfixturevalue(which)
    for prompt in TOOL_PROMPTS:
        for choice, allowed in (
            ("required", {"get_weather", "add"}),
            ({"type": "function", "function": {"name": "add"}}, {"add"}),
        ):
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "tools": TOOLS,
                "tool_choice": choice,
                "parallel_tool_calls": False,
                "max_tokens": 256,  # the tiny model's 384-token vocabulary spells a call in many tokens
            }
            out = _chat(cluster, body)
            assert out["choices"][0]["finish_reason"] == "tool_calls", out
            calls = _assert_valid_calls(out["choices"][0]["message"], allowed)
            assert len(calls) == 1
    # Streamed: the same call (ids are fresh per reply).
    text, streamed, finish = _streamed(_sse(cluster, body))
    assert finish == "tool_calls" and not text.strip()
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
    ]


@pytest.mark.parametrize("which", ["cluster2", "qwen_cluster"])
def test_none_never_calls(which, request):
    cluster = request.getfixturevalue(which)
    for prompt in TOOL_PROMPTS[:2]:
        body = {"messages": [{"role": "user", "content": prompt}], "tools": TOOLS, "tool_choice": "none"}
        out = _chat(cluster, {**body, "max_tokens": 32})
        assert out["choices"][0]["finish_reason"] != "tool_calls"
        assert "tool_calls" not in out["choices"][0]["message"]
        assert isinstance(out["choices"][0]["message"]["content"], str)


@pytest.mark.parametrize("which", ["cluster2", "qwen_cluster"])
def test_two_turn_agent_loop(which, request):
    """call -> tool result -> answer, with the openai client."""
    cluster = request.getfixturevalue(which)
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    messages: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="required", max_tokens=256, temperature=0
    )
    assert first.choices[0].finish_reason == "tool_calls"
    msg = first.choices[0].message
    messages.append(msg.model_dump(exclude_none=True))
    for call in msg.tool_calls:
        result = {"temperature": 21, "sky": "clear"} if call.function.name == "get_weather" else {"sum": 42}
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    second = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="auto", max_tokens=48, temperature=0
    )
    reply = second.choices[0]
    assert reply.finish_reason in ("stop", "length", "tool_calls")
    if reply.finish_reason == "tool_calls":  # auto may call again: still a valid call of a declared tool
        for call in reply.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    else:
        assert reply.message.content is not None


# -- failover ------------------------------------------------------------------------------------------


async def _stream_chat(session, url: str, body: dict, started: asyncio.Event) -> dict:
    text, finish = [], None
    async with session.post(f"{url}/v1/chat/completions", json={**body, "stream": True}) as resp:
        if resp.status != 200:
            return {"status": resp.status, "error": await resp.text()}
        async for event in sse_events(resp):
            if "error" in event:
                return {"status": 200, "error": event["error"]}
            choice = event["choices"][0]
            if choice["delta"].get("content"):
                text.append(choice["delta"]["content"])
                started.set()
            finish = choice["finish_reason"] or finish
    return {"status": 200, "text": "".join(text), "finish": finish}


def _run(url: str, bodies: list[dict], fault=None) -> list[dict]:
    async def main():
        started = asyncio.Event()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            tasks = [asyncio.create_task(_stream_chat(session, url, b, started)) for b in bodies]
            if fault is not None:
                await asyncio.wait_for(started.wait(), 120)
                await asyncio.sleep(0.3)
                await asyncio.get_running_loop().run_in_executor(None, fault)
            return await asyncio.gather(*tasks)

    return asyncio.run(main())


def test_failover_mid_generation_rebuilds_the_grammar(procs, tmp_path):
    """The last stage's replica dies mid-generation: the new one rebuilds each grammar from the replayed tokens
    (``accept``) and the constrained output is the same as without the failure."""
    cluster = Cluster(procs, demo_model_dir(2), tmp_path, replicas=2, coordinator_extra={"prefix_cache": False})
    cluster.start()
    bodies = [
        {
            "messages": [{"role": "user", "content": p}],
            "response_format": _json_format(ORDER_SCHEMA),
            "max_tokens": 160,
            "temperature": 0,
        }
        for p in ("An order from Carol.", "Two blue cups for Dan.", "Erin pays for a hat.")
    ]
    reference = _run(cluster.url, bodies)
    for r in reference:
        assert r["status"] == 200 and r["finish"] == "stop", r
        jsonschema.validate(json.loads(r["text"]), ORDER_SCHEMA)

    def kill():
        _, view = http_json(f"{cluster.url}/v1/cluster")
        reps = [r for r in view["replicas"] if r["stage"] == 1]
        url = max(reps, key=lambda r: r["sequences"])["url"]
        cluster.stage_procs[url].send_signal(signal.SIGKILL)

    results = _run(cluster.url, bodies, fault=kill)
    assert results == reference
    with urllib.request.urlopen(f"{cluster.url}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    failovers = sum(
        float(v) for v in re.findall(r"^coordinator_failovers_total(?:\{[^}]*\})? ([0-9.e+]+)$", metrics, re.M)
    )
    assert failovers >= 1, "the kill did not hit a running sequence"


def test_qwen_template_sees_the_tools(qwen_cluster):
    """The prompt went through the model's own template (its ``<tools>`` block), not the generic format."""
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 96,
    }
    plain = _chat(qwen_cluster, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    with_tools = _chat(qwen_cluster, body)
    assert with_tools["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 50
    calls = with_tools["choices"][0]["message"]["tool_calls"]
    assert calls and with_tools["choices"][0]["message"]["content"] is None
