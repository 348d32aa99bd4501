"""The served pipeline (real stage and coordinator processes, real llama.cpp) against the whole model."""

from __future__ import annotations

import json
import urllib.request

import pytest

from chatloop.coordinator.chat_template import ChatTemplate
from chatloop.demo import demo_model_dir
from tests.cluster_harness import Cluster, http_json
from tests.reference import whole_model_greedy
from tests.sse import post_sse
from tests.waiting import wait_until

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
]
N_TOKENS = 24


@pytest.fixture(scope="module")
def reference():
    """Greedy continuations from the whole model in one process."""
    with whole_model_greedy(N_TOKENS) as ref:
        yield ref


@pytest.fixture(scope="module")
def cluster2(module_procs, tmp_path_factory):
    return Cluster(module_procs, demo_model_dir(2), tmp_path_factory.mktemp("c2")).start()


@pytest.fixture(scope="module")
def cluster3(module_procs, model3, tmp_path_factory):
    return Cluster(module_procs, model3, tmp_path_factory.mktemp("c3")).start()


@pytest.mark.parametrize("which", ["cluster2", "cluster3"])
def test_greedy_equals_whole_model(which, request, reference):
    cluster = request.getfixturevalue(which)
    tok, generate = reference
    for prompt in PROMPTS:
        ids = tok.tokenize(prompt)
        status, body = http_json(
            f"{cluster.url}/v1/inference", {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
        )
        assert status == 200, body
        expected = generate(ids)
        assert body["tokens"] == expected, prompt
        assert body["usage"]["prompt_tokens"] == len(ids)
        assert body["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("which", ["cluster2", "cluster3"])
def test_completions_streamed_and_not_agree(which, request, reference):
    cluster = request.getfixturevalue(which)
    tok, generate = reference
    prompt = PROMPTS[0]
    expected_text = tok.detokenize([t for t in generate(tok.tokenize(prompt)) if not tok.is_eog(t)])
    status, body = http_json(
        f"{cluster.url}/v1/completions", {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
    )
    assert status == 200, body
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected_text
    events = post_sse(
        f"{cluster.url}/v1/completions",
        {
            "prompt": prompt,
            "max_tokens": N_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert events[-1] == {"done": True}
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e.get("choices"))
    assert text == expected_text
    assert events[-2]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]
    assert events[-3]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


@pytest.mark.parametrize("which", ["cluster2", "cluster3"])
def test_chat_streamed_and_not_equal_whole_model(which, request, reference):
    cluster = request.getfixturevalue(which)
    tok, generate = reference
    messages = [{"role": "user", "content": "Name three colours."}]
    rendered = ChatTemplate.from_tokenizer(tok).render(messages)
    expected = tok.detokenize([t for t in generate(tok.tokenize(rendered, add_special=True)) if not tok.is_eog(t)])
    body = {"messages": messages, "max_tokens": N_TOKENS, "temperature": 0}
    status, out = http_json(f"{cluster.url}/v1/chat/completions", body)
    assert status == 200, out
    assert out["choices"][0]["message"] == {"role": "assistant", "content": expected}
    events = post_sse(f"{cluster.url}/v1/chat/completions", {**body, "stream": True})
    assert events[0]["choices"][0]["delta"].get("role") == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e.get("choices"))
    assert text == expected


def test_openai_client(cluster2):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{cluster2.url}/v1", api_key="unused")
    models = client.models.list()
    name = models.data[0].id
    chat = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 8
    comp = client.completions.create(model=name, prompt="The sky is", max_tokens=8, temperature=0)
    assert comp.choices[0].finish_reason in ("length", "stop")
    stream = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


def test_stop_strings_and_logprobs(cluster2, reference):
    tok, generate = reference
    prompt = "1, 2, 3, 4,"
    full = tok.detokenize(generate(tok.tokenize(prompt)))
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a stop string somewhere in the middle, spanning tokens
    status, body = http_json(
        f"{cluster2.url}/v1/completions",
        {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "stop": [stop], "logprobs": 3},
    )
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert stop not in choice["text"]
    assert full.startswith(choice["text"])
    lp = choice["logprobs"]
    assert all(x <= 0 for x in lp["token_logprobs"])
    assert all(len(t) == 3 for t in lp["top_logprobs"])
    events = post_sse(
        f"{cluster2.url}/v1/completions",
        {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "stop": stop, "stream": True},
    )
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]


def test_seeded_sampling_reproduces(cluster2):
    body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.9, "top_k": 40, "seed": 7}
    a = http_json(f"{cluster2.url}/v1/inference", body)[1]
    b = http_json(f"{cluster2.url}/v1/inference", body)[1]
    c = http_json(f"{cluster2.url}/v1/inference", {**body, "seed": 8})[1]
    assert a["tokens"] == b["tokens"]
    assert a["tokens"] != c["tokens"]


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": 5}, "temperature"),
        ("/v1/completions", {"prompt": 5}, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10_000_000}, "max_tokens"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ("/v1/completions", {"prompt": "x", "stop": ["a"] * 100}, "stop"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"999999999": 1}}, "logit_bias"),
        ("/v1/inference", {"prompt": ["x"]}, "prompt"),
    ],
)
def test_bad_requests_get_400(cluster2, path, body, param):
    status, out = http_json(f"{cluster2.url}{path}", body)
    assert status == 400, out
    assert out["error"]["param"] == param
    assert out["error"]["type"] == "invalid_request_error"
    assert out["error"]["message"]


def test_prompt_longer_than_context_gets_400(cluster2):
    status, out = http_json(f"{cluster2.url}/v1/completions", {"prompt": "hello " * 40000, "max_tokens": 4})
    assert status == 400
    assert out["error"]["code"] == "context_length_exceeded"


def test_invalid_json_and_unknown_route(cluster2):
    req = urllib.request.Request(
        f"{cluster2.url}/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 400
    assert "error" in json.loads(err.value.read())
    status, out = http_json(f"{cluster2.url}/v1/nothing")
    assert status == 404 and "error" in out


def test_disconnect_mid_stream_frees_every_stage(cluster2):
    import http.client

    host, port = cluster2.url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    # A counting prompt keeps going until max_tokens (no early end of text).
    body = json.dumps({"prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 400, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    for _ in range(3):
        resp.readline()
    assert max(cluster2.live_sequences()) >= 1  # this stream (an earlier release may still be in flight)
    conn.sock.close()
    conn.close()
    wait_until(lambda: cluster2.live_sequences() == [0, 0], what="sequences freed")


def test_stage_down_at_start_means_not_ready(procs, tmp_path_factory):
    cluster = Cluster(procs, demo_model_dir(2), tmp_path_factory.mktemp("down"))
    cluster.start_stage(cluster.stage_urls[0][0])
    cluster.start_coordinator(wait=False)
    wait_until(lambda: http_json(f"{cluster.url}/healthz")[0] == 200, what="coordinator up")
    status, body = http_json(f"{cluster.url}/readyz")
    assert status == 503
    status, body = http_json(f"{cluster.url}/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 503
    assert body["error"]["message"]
    cluster.start_stage(cluster.stage_urls[1][0])
    wait_until(lambda: http_json(f"{cluster.url}/readyz")[0] == 200, what="ready after stage start")
    status, body = http_json(f"{cluster.url}/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 0})
    assert status == 200, body


def test_stage_info_and_metrics(cluster2):
    status, info = http_json(f"{cluster2.stage_urls[0][0]}/v1/info")
    assert status == 200
    assert info["layer_start"] == 0 and info["has_embedding"] and not info["has_head"]
    assert info["simd"] and "system_info" in info
    with urllib.request.urlopen(f"{cluster2.stage_urls[1][0]}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    assert "worker_forward_duration_seconds_bucket" in text
    with urllib.request.urlopen(f"{cluster2.url}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    assert "inference_tokens_generated_total" in text
    status, view = http_json(f"{cluster2.url}/v1/cluster")
    assert status == 200 and all(r["state"] == "healthy" for r in view["replicas"])
