"""``topology: chain`` with real stage and coordinator processes and real llama.cpp (docs/design.md, "The chain data
plane"): greedy output through 2 and 3 stages equals the whole model, streamed equals non-streamed, concurrent
streams equal each alone, a client that disconnects frees its sequence everywhere; the cluster token guards every
link (the stages here require it)."""

from __future__ import annotations

import json
import pathlib
import urllib.request

import pytest

from chatloop.coordinator.chat_template import ChatTemplate
from chatloop.demo import demo_model_dir
from tests.cluster_harness import Cluster, http_json
from tests.reference import whole_model_greedy
from tests.sse import post_sse
from tests.test_failover import PROMPTS as STREAM_PROMPTS
from tests.test_failover import run_streams
from tests.waiting import wait_until

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
N_TOKENS = 24
TOKEN = {"security": {"cluster_token": "chain-serving-token"}}
CHAIN = {"topology": "chain", **TOKEN}


@pytest.fixture(scope="module")
def reference():
    with whole_model_greedy(N_TOKENS) as ref:
        yield ref


@pytest.fixture(scope="module")
def chain2(module_procs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain2")
    return Cluster(module_procs, demo_model_dir(2), tmp, stage_extra=TOKEN, coordinator_extra=CHAIN).start()


@pytest.fixture(scope="module")
def chain2_no_ring(module_procs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain2_no_ring")
    extra = {**CHAIN, "ring_steps": False}
    return Cluster(module_procs, demo_model_dir(2), tmp, stage_extra=TOKEN, coordinator_extra=extra).start()


@pytest.fixture(scope="module")
def chain3(module_procs, model3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain3")
    return Cluster(module_procs, model3, tmp, stage_extra=TOKEN, coordinator_extra=CHAIN).start()


@pytest.mark.parametrize("which", ["chain2", "chain3", "chain2_no_ring"])
def test_chain_greedy_equals_whole_model(which, request, reference):
    """Also the number of ring steps: most decode steps go round without the coordinator's turn, none when
    ``ring_steps`` is off; and every stage (one llama.cpp thread) decodes most steps on its event loop's thread."""
    cluster = request.getfixturevalue(which)
    tok, generate = reference
    before = _coordinator_counter(cluster.url, "coordinator_ring_steps_total")
    urls = [url for group in cluster.stage_urls for url in group]
    inline_before = [_stage_counter(url, "worker_inline_steps_total") for url in urls]
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
        status, out = http_json(f"{cluster.url}/v1/inference", body)
        assert status == 200, out
        assert out["tokens"] == generate(tok.tokenize(prompt)), prompt
    rings = _coordinator_counter(cluster.url, "coordinator_ring_steps_total") - before
    if which == "chain2_no_ring":
        assert rings == 0
    else:
        assert rings >= len(PROMPTS) * N_TOKENS // 2, rings
    inline = [_stage_counter(url, "worker_inline_steps_total") - b for url, b in zip(urls, inline_before)]
    assert all(n >= len(PROMPTS) * N_TOKENS // 2 for n in inline), inline


def _coordinator_counter(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)


def test_chain_stop_string_inside_a_ring_step_and_the_cached_prefix_after_it(chain2, reference):
    """A stop string ends a sequence while its next ring step is already under way: the text ends before the stop
    string, and the sequence's KV (kept as a prefix cache entry, one ring position longer in the stages) gives the
    next turn the whole model's tokens."""
    tok, generate = reference
    prompt = " ".join(f"Item {i}: the {PROMPTS[i % 3].lower()}" for i in range(12))
    assert len(tok.tokenize(prompt)) > 2 * 64
    body = {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
    status, out = http_json(f"{chain2.url}/v1/completions", body)
    assert status == 200, out
    full = out["choices"][0]["text"]
    cut = len(full) // 2
    stop = full[cut : cut + 3]
    assert stop.strip(), full
    last = chain2.stage_urls[-1][0]
    revoked = _stage_counter(last, "worker_chain_ring_revokes_total")
    status, out = http_json(f"{chain2.url}/v1/completions", {**body, "stop": [stop]})
    assert status == 200, out
    assert out["choices"][0]["text"] == full[: full.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    # Its micro-batch ended with it: its ring is revoked at the last stage (else it would go round to its last id).
    wait_until(
        lambda: _stage_counter(last, "worker_chain_ring_revokes_total") > revoked, what="the stopped sequence revoked"
    )
    follow = prompt + full[: full.index(stop)] + " And then"
    hits = _coordinator_counter(chain2.url, "coordinator_prefix_cache_hit_tokens_total")
    status, out = http_json(f"{chain2.url}/v1/inference", {**body, "prompt": follow})
    assert status == 200, out
    assert out["tokens"] == generate(tok.tokenize(follow))
    assert _coordinator_counter(chain2.url, "coordinator_prefix_cache_hit_tokens_total") - hits >= 2 * 64


def _stage_counter(url: str, name: str) -> float:
    req = urllib.request.Request(f"{url}/metrics", headers={"X-ChatLoop-Token": TOKEN["security"]["cluster_token"]})
    text = urllib.request.urlopen(req, timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.parametrize("which", ["chain2", "chain3"])
def test_chain_long_prompt_passed_on_in_parts_equals_whole_model(which, request, reference):
    """A prompt chunk of several 64-row blocks leaves stage 0 in parts, each passed on before the next is computed
    (the next stage starts sooner); the completion is still the whole model's, token for token."""
    cluster = request.getfixturevalue(which)
    tok, generate = reference
    prompt = " ".join(f"Item {i}: the {PROMPTS[i % 3].lower()}" for i in range(40))
    assert len(tok.tokenize(prompt)) > 4 * 64
    first = cluster.stage_urls[0][0]
    before = _stage_counter(first, "worker_chain_parts_total")
    body = {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
    status, out = http_json(f"{cluster.url}/v1/inference", body)
    assert status == 200, out
    assert out["tokens"] == generate(tok.tokenize(prompt))
    assert _stage_counter(first, "worker_chain_parts_total") - before >= 4  # the 256-row chunk: 4 parts


@pytest.mark.parametrize("which", ["chain2", "chain3"])
def test_chain_streamed_equals_non_streamed_and_whole_model(which, request, reference):
    cluster = request.getfixturevalue(which)
    tok, generate = reference
    prompt = PROMPTS[2]
    expected = tok.detokenize([t for t in generate(tok.tokenize(prompt)) if not tok.is_eog(t)])
    body = {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
    status, out = http_json(f"{cluster.url}/v1/completions", body)
    assert status == 200, out
    assert out["choices"][0]["text"] == expected
    events = post_sse(f"{cluster.url}/v1/completions", {**body, "stream": True})
    assert events[-1] == {"done": True}
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e.get("choices")) == expected


@pytest.mark.parametrize("which", ["chain2", "chain3"])
def test_chain_chat_equals_whole_model(which, request, reference):
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
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e.get("choices")) == expected


def test_chain_concurrent_streams_equal_each_alone(chain3):
    together = run_streams(chain3.url, prompts=STREAM_PROMPTS, max_tokens=32)
    alone = [run_streams(chain3.url, prompts=[p], max_tokens=32)[0] for p in STREAM_PROMPTS]
    for got, want in zip(together, alone, strict=True):
        assert got["status"] == 200 and got["error"] is None, got
        assert got["text"] == want["text"]


def test_chain_newcomers_join_streams_that_go_round_in_ring_steps(chain3):
    """Each stream starts once the one before has its first token, so each newcomer joins a micro-batch whose
    members decode in ring steps (it waits at most one step, then the micro-batch steps with it): every text
    equals the stream run alone."""
    import asyncio

    import aiohttp

    from tests.test_failover import _stream

    prompts = STREAM_PROMPTS[:5]

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            tasks = []
            for p in prompts:
                first = asyncio.Event()
                tasks.append(asyncio.create_task(_stream(session, chain3.url, p, first, 32)))
                await asyncio.wait_for(first.wait(), 300)
            return await asyncio.gather(*tasks)

    staggered = asyncio.run(main())
    alone = [run_streams(chain3.url, prompts=[p], max_tokens=32)[0] for p in prompts]
    for got, want in zip(staggered, alone, strict=True):
        assert got["status"] == 200 and got["error"] is None, got
        assert got["text"] == want["text"]


def test_chain_disconnect_mid_stream_frees_every_stage(chain2):
    import http.client

    host, port = chain2.url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 400, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    for _ in range(3):
        resp.readline()
    assert max(chain2.live_sequences()) >= 1
    conn.sock.close()
    conn.close()
    wait_until(lambda: chain2.live_sequences() == [0, 0], what="sequences freed")


def test_chain_metrics_and_stage_auth(chain2):
    token = TOKEN["security"]["cluster_token"]
    url = chain2.stage_urls[1][0]
    assert http_json(f"{url}/v1/info")[0] == 401
    assert http_json(f"{url}/v1/peers", {"coordinator": "x", "peers": {}})[0] == 401
    status, _ = http_json(f"{url}/v1/info", headers={"X-ChatLoop-Token": token})
    assert status == 200
    req = urllib.request.Request(f"{url}/metrics", headers={"X-ChatLoop-Token": token})
    text = urllib.request.urlopen(req, timeout=30).read().decode()
    ok = [
        line for line in text.splitlines() if line.startswith("worker_forward_requests_total") and 'status="ok"' in line
    ]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) > 0  # the chain's steps count as forward calls
    passes = [line for line in text.splitlines() if line.startswith("worker_ubatches_total")]
    assert passes and float(passes[0].rsplit(" ", 1)[1]) > 0  # passes over the weights (engine/slots.py)
    coordinator = urllib.request.urlopen(f"{chain2.url}/metrics", timeout=30).read().decode()
    steps = [
        line for line in coordinator.splitlines() if line.startswith("coordinator_worker_response_time_seconds_count")
    ]
    assert any('stage="chain"' in line for line in steps), steps


def test_chain_stage_process_refuses_untrusted_input_and_keeps_serving(chain2, reference):
    """Against a running stage process: a stream without the token, a frame naming an unregistered peer, a
    truncated frame, a stale epoch and a stream cut mid-message are refused with a logged reason; the chain serves on."""
    import asyncio

    import aiohttp
    import numpy as np

    from chatloop.protocol.chain import UNKNOWN_PEER, ChainError, decode_reply, encode_chain

    token = TOKEN["security"]["cluster_token"]
    url = chain2.stage_urls[0][0]
    proc = chain2.stage_procs[url]

    async def main():
        async with aiohttp.ClientSession() as session:
            headers = {"X-ChatLoop-Stream": "coordinator", "X-ChatLoop-Coordinator": "intruder"}
            try:
                await session.ws_connect(f"{url}/v1/stream", headers=headers)
                raise AssertionError("a stream without the cluster token was accepted")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 401
            ws = await session.ws_connect(f"{url}/v1/stream", headers={**headers, "X-ChatLoop-Token": token})
            ids = np.array([1, 2, 3], dtype=np.int32)
            steps = [{"seq": 4242, "pos": 0, "n": 3}]
            # Nobody registered peers for coordinator "intruder": replica 0 of stage 1 is unknown here.
            await ws.send_bytes(encode_chain("intruder", 7, 0, steps, [[0, 0]], [1], ids))
            reply = decode_reply((await ws.receive(timeout=60)).data)
            assert isinstance(reply, ChainError) and reply.code == UNKNOWN_PEER
            frame = encode_chain("intruder", 8, 0, steps, [[0, 0]], [1], ids)
            await ws.send_bytes(frame[:-4])  # truncated
            reply = decode_reply((await ws.receive(timeout=60)).data)
            assert isinstance(reply, ChainError) and reply.code == "bad_frame"
            await ws.close()

    asyncio.run(main())
    log_text = lambda: pathlib.Path(proc.log_path).read_text(errors="replace")  # noqa: E731
    wait_until(lambda: "without the cluster token" in log_text(), what="refused stream logged")
    assert "never registered here" in log_text()
    assert "needs 12 bytes, frame carries 8" in log_text()
    # The stage and the chain serve on.
    tok, generate = reference
    status, out = http_json(
        f"{chain2.url}/v1/inference", {"prompt": PROMPTS[0], "max_tokens": N_TOKENS, "temperature": 0}
    )
    assert status == 200 and out["tokens"] == generate(tok.tokenize(PROMPTS[0]))
