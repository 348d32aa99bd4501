"""Request validation: any JSON body gives a GenerationRequest or a RequestError naming the field; the limits
that need the served model (prompt bytes, context, body size) are checked over HTTP on a live coordinator."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatloop.coordinator.api_schema import (
    MAX_LOGIT_BIAS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    ROLES,
    GenerationRequest,
    RequestError,
    parse_chat,
    parse_completion,
    parse_native,
)
from chatloop.demo import demo_model_dir
from tests.cluster_harness import Cluster, http_json, wait_until

N_VOCAB = 2000
PARSERS = {"completion": parse_completion, "chat": parse_chat, "native": parse_native}
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.integers(min_value=10**18, max_value=10**4000)  # hypothesis itself cannot print longer ones
    | st.floats()  # NaN and infinities included: Python's json accepts them
    | st.text(max_size=12)
    | st.sampled_from(["\ud800", "x\udfffy"])  # lone surrogates, as JSON "\ud800" escapes give
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
parts = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | json_values, "text": json_values})
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from([*ROLES, "robot"]) | json_values,
            "content": st.text(max_size=20) | st.lists(parts, max_size=3) | json_values,
            "name": json_values,
        },
    )
    | json_values,
    max_size=4,
)
plausible = {
    "model": st.sampled_from(["m", ""]) | json_values,
    "model_id": st.sampled_from(["m"]) | json_values,
    "prompt": st.text(max_size=20) | st.lists(st.integers(-2, N_VOCAB + 2), max_size=5) | json_values,
    "messages": messages | json_values,
    "max_tokens": st.integers(-1, (1 << 20) + 1) | json_values,
    "max_completion_tokens": st.integers(-1, 5) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-0.5, 1.5) | json_values,
    "top_k": st.integers(-2, 10) | json_values,
    "min_p": st.floats(-0.5, 1.5) | json_values,
    "presence_penalty": st.floats(-3, 3) | json_values,
    "frequency_penalty": st.floats(-3, 3) | json_values,
    "repeat_penalty": st.floats(-1, 200) | json_values,
    "repetition_penalty": st.floats(-1, 200) | json_values,
    "seed": st.integers() | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20) | json_values,
    "logit_bias": st.dictionaries(st.integers(-5, N_VOCAB + 5).map(str), st.floats(-200, 200), max_size=4)
    | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": json_values}) | json_values,
    "n": st.sampled_from([1, 2, 1.0]) | json_values,
    "best_of": st.sampled_from([1, 2]) | json_values,
    "logprobs": st.booleans() | st.integers(-1, 21) | json_values,
    "top_logprobs": st.integers(-1, 21) | json_values,
    "echo": st.booleans() | json_values,
    "suffix": json_values,
    "user": json_values,
}
bodies = st.fixed_dictionaries({}, optional=plausible) | st.dictionaries(st.text(max_size=8), json_values) | json_values


def _check(kind: str, body) -> None:
    body = json.loads(json.dumps(body))  # what the server would see
    try:
        req = PARSERS[kind](body, N_VOCAB)
    except RequestError as exc:
        assert str(exc) and exc.status == 400
        if isinstance(body, dict):
            assert isinstance(exc.param, str) and exc.param
        return
    assert isinstance(req, GenerationRequest) and isinstance(body, dict)
    s = req.sampling
    assert 0 <= s.temperature <= 2 and 0 < s.top_p <= 1 and 0 <= s.min_p <= 1 and s.top_k >= 0
    assert req.max_tokens is None or 1 <= req.max_tokens <= 1 << 20
    assert len(req.stop) <= MAX_STOP_STRINGS and all(0 < len(x) <= MAX_STOP_CHARS for x in req.stop)
    assert len(s.logit_bias) <= MAX_LOGIT_BIAS and all(0 <= t < N_VOCAB for t in s.logit_bias)
    assert s.seed is None or 0 <= s.seed < 2**32
    texts = [req.prompt_text or "", *req.stop, *(m["content"] for m in req.messages or [])]
    for text in texts:
        text.encode("utf-8")  # everything that reaches the tokenizer is valid text
    if req.prompt_tokens is not None:
        assert req.prompt_tokens and all(type(t) is int and 0 <= t < N_VOCAB for t in req.prompt_tokens)
    if kind == "chat":
        assert req.messages and all(m["role"] in ROLES and isinstance(m["content"], str) for m in req.messages)
    if kind == "native":
        assert isinstance(req.prompt_text, str) and not req.stream


@FUZZ
@given(st.sampled_from(sorted(PARSERS)), bodies)
def test_any_body_is_a_request_or_names_the_bad_field(kind, body):
    _check(kind, body)


@FUZZ
@given(st.sampled_from(sorted(PARSERS)), st.fixed_dictionaries({}, optional=plausible))
def test_plausible_bodies(kind, body):
    if kind == "chat":
        body.setdefault("messages", [{"role": "user"}])
    else:
        body.setdefault("prompt", "hi")
    _check(kind, body)


# -- explicit cases ------------------------------------------------------------------------------------

BASE = {
    "completion": {"prompt": "hi"},
    "chat": {"messages": [{"role": "user", "content": "hi"}]},
    "native": {"prompt": "hi"},
}
BAD = [
    # field, value, the param named in the error
    ("max_tokens", 0, "max_tokens"),
    ("max_tokens", (1 << 20) + 1, "max_tokens"),
    ("max_tokens", 1.5, "max_tokens"),
    ("max_tokens", "8", "max_tokens"),
    ("max_tokens", True, "max_tokens"),
    ("max_tokens", 10**5000, "max_tokens"),
    ("max_tokens", float("inf"), "max_tokens"),
    ("max_completion_tokens", -1, "max_completion_tokens"),
    ("temperature", -0.1, "temperature"),
    ("temperature", 2.01, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("temperature", 10**400, "temperature"),
    ("temperature", [1], "temperature"),
    ("top_p", 1.5, "top_p"),
    ("top_k", -2, "top_k"),
    ("top_k", 0.5, "top_k"),
    ("min_p", -0.1, "min_p"),
    ("presence_penalty", 2.5, "presence_penalty"),
    ("frequency_penalty", -2.5, "frequency_penalty"),
    ("repeat_penalty", 0, "repeat_penalty"),
    ("repetition_penalty", 101, "repetition_penalty"),
    ("repetition_penalty", {"repeat_penalty": 1.1, "repetition_penalty": -1}, "repetition_penalty"),  # both checked
    ("max_completion_tokens", {"max_tokens": 5, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("seed", 1.5, "seed"),
    ("seed", "1", "seed"),
    ("seed", False, "seed"),
    ("stop", 1, "stop"),
    ("stop", ["a", 1], "stop"),
    ("stop", ["s"] * (MAX_STOP_STRINGS + 1), "stop"),
    ("stop", "x" * (MAX_STOP_CHARS + 1), "stop"),
    ("stop", "\ud800", "stop"),
    ("logit_bias", [], "logit_bias"),
    ("logit_bias", {"a": 1}, "logit_bias"),
    ("logit_bias", {str(N_VOCAB): 1}, "logit_bias"),
    ("logit_bias", {"-1": 1}, "logit_bias"),
    ("logit_bias", {" 7": 1}, "logit_bias"),
    ("logit_bias", {"+7": 1}, "logit_bias"),
    ("logit_bias", {"\u0667": 1}, "logit_bias"),  # an Arabic-Indic 7: int() takes it, the document does not
    ("logit_bias", {"00000000007": 1}, "logit_bias"),
    ("logit_bias", {"9" * 5000: 1}, "logit_bias"),
    ("logit_bias", {"1": 101}, "logit_bias"),
    ("logit_bias", {"1": "1"}, "logit_bias"),
    ("logit_bias", {"1": float("nan")}, "logit_bias"),
    ("logit_bias", {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}, "logit_bias"),
    ("stream_options", "yes", "stream_options"),
    ("stream_options", {"include_usage": "yes"}, "stream_options"),
    ("n", 2, "n"),
    ("n", True, "n"),
    ("best_of", 3, "best_of"),
    ("model", 7, "model"),
]


@pytest.mark.parametrize("kind", sorted(PARSERS))
@pytest.mark.parametrize(("field", "value", "param"), BAD, ids=[f"{i}-{f}" for i, (f, _, _) in enumerate(BAD)])
def test_bad_field(kind, field, value, param):
    if kind == "native" and field == "model":
        field = param = "model_id"
    fields = value if isinstance(value, dict) and field in value else {field: value}
    with pytest.raises(RequestError) as err:
        PARSERS[kind]({**BASE[kind], **fields}, N_VOCAB)
    assert err.value.param == param and err.value.status == 400


GOOD = [
    ("max_tokens", 1),
    ("max_tokens", 1 << 20),
    ("max_tokens", 4.0),
    ("max_completion_tokens", 3),
    ("temperature", 0),
    ("temperature", 2),
    ("top_p", 0),
    ("top_k", -1),
    ("repetition_penalty", 1.1),
    ("seed", -(10**30)),
    ("stop", ["s"] * MAX_STOP_STRINGS),
    ("stop", "x" * MAX_STOP_CHARS),
    ("stop", None),
    ("logit_bias", {str(i): -100 for i in range(MAX_LOGIT_BIAS)}),
    ("logit_bias", {str(N_VOCAB - 1): 100.0}),
    ("stream_options", {"include_usage": True}),
    ("n", 1),
    ("best_of", 1),
    ("some_future_field", {"anything": [1, 2]}),  # unknown fields are ignored, as documented
]


@pytest.mark.parametrize("kind", sorted(PARSERS))
@pytest.mark.parametrize(("field", "value"), GOOD, ids=[f"{i}-{f}" for i, (f, _) in enumerate(GOOD)])
def test_good_field(kind, field, value):
    req = PARSERS[kind]({**BASE[kind], field: value}, N_VOCAB)
    if field == "max_tokens":
        assert req.max_tokens == int(value)
    if field == "top_p":
        assert 0 < req.sampling.top_p < 1e-6  # OpenAI's 0: only the most likely token
    if field == "seed":
        assert 0 <= req.sampling.seed < 2**32


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("completion", {}, "prompt"),
        ("completion", {"prompt": None}, "prompt"),
        ("completion", {"prompt": []}, "prompt"),
        ("completion", {"prompt": [1, "a"]}, "prompt"),
        ("completion", {"prompt": [1, True]}, "prompt"),
        ("completion", {"prompt": [1, 2.5]}, "prompt"),
        ("completion", {"prompt": [1, float("inf")]}, "prompt"),
        ("completion", {"prompt": [N_VOCAB]}, "prompt"),
        ("completion", {"prompt": ["a", "b"]}, "prompt"),
        ("completion", {"prompt": "\ud800"}, "prompt"),
        ("completion", {"prompt": "a", "echo": True}, "echo"),
        ("completion", {"prompt": "a", "suffix": "b"}, "suffix"),
        ("completion", {"prompt": "a", "logprobs": 21}, "logprobs"),
        ("completion", {"prompt": "a", "logprobs": True}, "logprobs"),
        ("chat", {}, "messages"),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": {"role": "user"}}, "messages"),
        ("chat", {"messages": ["hi"]}, "messages"),
        ("chat", {"messages": [{"content": "hi"}]}, "messages"),
        ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
        ("chat", {"messages": [{"role": ["user"], "content": "hi"}]}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, "messages"),
        ("chat", {"messages": [{"role": "user"}] * 4097}, "messages"),
        ("chat", {"messages": [{"role": "user"}], "top_logprobs": 2}, "top_logprobs"),
        ("chat", {"messages": [{"role": "user"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"messages": [{"role": "user"}], "logprobs": 1}, "logprobs"),
        ("native", {}, "prompt"),
        ("native", {"prompt": ["a"]}, "prompt"),
        ("native", {"prompt": "a", "stream": True}, "stream"),
        ("native", {"prompt": "a", "stream": "yes"}, "stream"),
    ],
)
def test_bad_request_shapes(kind, body, param):
    with pytest.raises(RequestError) as err:
        PARSERS[kind](body, N_VOCAB)
    assert err.value.param == param


@pytest.mark.parametrize("body", [None, [], "x", 1, [{"prompt": "a"}]])
@pytest.mark.parametrize("kind", sorted(PARSERS))
def test_body_must_be_an_object(kind, body):
    with pytest.raises(RequestError, match="JSON object"):
        PARSERS[kind](body, N_VOCAB)


def test_token_id_prompts():
    assert parse_completion({"prompt": [[3, 4.0]]}, N_VOCAB).prompt_tokens == [3, 4]
    assert all(type(t) is int for t in parse_completion({"prompt": [5.0]}, N_VOCAB).prompt_tokens)


def test_chat_content_parts_and_roles():
    req = parse_chat(
        {
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "user", "content": None, "name": "ignored"},
            ],
            "logprobs": True,
            "top_logprobs": 3,
        },
        N_VOCAB,
    )
    assert req.messages == [{"role": "system", "content": "ab"}, {"role": "user", "content": ""}]
    assert req.sampling.want_logprobs and req.sampling.n_logprobs == 3


# -- over HTTP, on a live coordinator --------------------------------------------------------------------

MAX_PROMPT_BYTES = 2000
MAX_BODY_BYTES = 50_000


@pytest.fixture(scope="module")
def cluster(module_procs, tmp_path_factory):
    extra = {"max_prompt_bytes": MAX_PROMPT_BYTES, "max_body_bytes": MAX_BODY_BYTES, "max_tokens_default": 4}
    return Cluster(module_procs, demo_model_dir(2), tmp_path_factory.mktemp("api"), coordinator_extra=extra).start()


def _raw(url: str, data: bytes, method: str = "POST", content_type: str = "application/json"):
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _assert_error(status: int, body, want_status: int, param: str | None = None, code: str | None = None) -> None:
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], body
    if param:
        assert err["param"] == param, body
    if code:
        assert err["code"] == code, body


@pytest.mark.slow
def test_prompt_bytes_limit_counts_bytes_not_characters(cluster):
    url = f"{cluster.url}/v1/completions"
    _assert_error(*http_json(url, {"prompt": "a" * (MAX_PROMPT_BYTES + 1), "max_tokens": 1}), 400, "prompt")
    # 1001 two-byte characters: under the limit in characters, over it in bytes.
    _assert_error(*http_json(url, {"prompt": "é" * (MAX_PROMPT_BYTES // 2 + 1), "max_tokens": 1}), 400, "prompt")
    native = f"{cluster.url}/v1/inference"
    _assert_error(*http_json(native, {"prompt": "a" * (MAX_PROMPT_BYTES + 1), "max_tokens": 1}), 400, "prompt")
    status, body = http_json(native, {"prompt": "word " * (MAX_PROMPT_BYTES // 5), "max_tokens": 1})
    assert status == 200 and body["usage"]["completion_tokens"] == 1, body


@pytest.mark.slow
def test_chat_prompt_limit_applies_to_the_rendered_template(cluster):
    # The content alone is under the limit; with the template's role markers it is over.
    msgs = [{"role": "user", "content": "a" * (MAX_PROMPT_BYTES - 10)}]
    status, body = http_json(f"{cluster.url}/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    _assert_error(status, body, 400, "prompt")


@pytest.mark.slow
def test_context_limits(cluster):
    url = f"{cluster.url}/v1/completions"
    status, body = http_json(url, {"prompt": [1] * 5000, "max_tokens": 1})
    _assert_error(status, body, 400, "prompt", "context_length_exceeded")
    status, body = http_json(url, {"prompt": "Hello", "max_tokens": 1 << 20})
    _assert_error(status, body, 400, "max_tokens", "context_length_exceeded")
    status, body = http_json(url, {"prompt": [1] * 5, "max_tokens": 1})
    assert status == 200, body


@pytest.mark.slow
def test_body_limit_and_unparseable_bodies(cluster):
    url = f"{cluster.url}/v1/completions"
    _assert_error(*_raw(url, b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'), 413)
    _assert_error(*_raw(url, b""), 400)
    _assert_error(*_raw(url, b"{not json"), 400)
    _assert_error(*_raw(url, b"\xff\xfe\x00"), 400)
    _assert_error(*_raw(url, b'"just a string"'), 400)
    _assert_error(*_raw(url, b'{"prompt": "\\ud800", "max_tokens": 1}'), 400, "prompt")
    _assert_error(*_raw(url, b'{"prompt": "a", "max_tokens": 1e999}'), 400, "max_tokens")
    _assert_error(*_raw(url, b'{"prompt": "a", "temperature": NaN}'), 400, "temperature")


@pytest.mark.slow
def test_pathological_json_is_a_400(cluster):
    url = f"{cluster.url}/v1/completions"
    _assert_error(*_raw(url, b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}"), 400)
    _assert_error(*_raw(url, b"[" * 20_000 + b"]" * 20_000), 400)


@pytest.mark.slow
def test_fields_needing_the_model(cluster):
    url = f"{cluster.url}/v1/completions"
    status, body = http_json(url, {"prompt": "a", "max_tokens": 1, "logit_bias": {"49152": 1}})
    _assert_error(status, body, 400, "logit_bias")
    status, body = http_json(url, {"prompt": [49152], "max_tokens": 1})
    _assert_error(status, body, 400, "prompt")
    status, body = http_json(url, {"prompt": "a", "max_tokens": 1, "model": "no-such-model"})
    _assert_error(status, body, 404, "model", "model_not_found")
    status, body = http_json(url, {"prompt": "a", "max_tokens": 1, "stop": ["x"] * 17})
    _assert_error(status, body, 400, "stop")


@pytest.mark.slow
def test_unknown_fields_are_ignored(cluster):
    body = {"prompt": "Hi", "max_tokens": 1, "frobnicate": {"deep": [1, None]}, "user": "me", "tools": []}
    status, got = http_json(f"{cluster.url}/v1/completions", body)
    assert status == 200 and got["usage"]["completion_tokens"] == 1, got
    status, got = http_json(f"{cluster.url}/v1/inference", {"prompt": "Hi", "max_tokens": 1, "extra": 1})
    assert status == 200, got
    status, doc = http_json(f"{cluster.url}/openapi.json")
    assert "Unknown request fields are ignored" in doc["info"]["description"]


@pytest.mark.slow
def test_wrong_method_and_path_use_the_error_shape(cluster):
    _assert_error(*_raw(f"{cluster.url}/v1/completions", None, method="GET"), 405)
    _assert_error(*_raw(f"{cluster.url}/v1/models", b"{}", method="POST"), 405)
    _assert_error(*_raw(f"{cluster.url}/v1/nothing", None, method="GET"), 404)
    req = urllib.request.Request(f"{cluster.url}/v1/chat/completions", method="GET")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code == 405 and "POST" in info.value.headers.get("Allow", ""), dict(info.value.headers)


@pytest.mark.slow
def test_no_sequence_left_behind(cluster):
    # Runs last in this module: every request above, rejected or not, freed its KV in every stage.
    status, _ = http_json(f"{cluster.url}/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200
    wait_until(lambda: cluster.live_sequences() == [0, 0], what="no live sequences")
    assert http_json(f"{cluster.url}/healthz")[0] == 200
