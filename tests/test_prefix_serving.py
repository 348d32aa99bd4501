"""The prefix cache through real stage and coordinator processes: the next turn of a conversation and requests
sharing a system prompt reuse cached KV, and greedy output stays exactly the whole model's."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from chatloop.demo import demo_model_dir
from chatloop.engine.tokenizer import Tokenizer
from tests.cluster_harness import Cluster, http_json, wait_ready, wait_until
from tests.reference import whole_model_greedy

N_TOKENS = 16
SYSTEM = (
    "You are the archivist of a small lighthouse museum. You answer questions about keepers, lamps, storms and "
    "ships in short plain sentences. You never invent dates. When you do not know, you say so. "
) * 4  # about 200 tokens: three whole 64-token blocks to reuse


@pytest.fixture(scope="module")
def reference():
    """Greedy continuations from the whole model in one process, no cache of any kind."""
    with whole_model_greedy(N_TOKENS) as ref:
        yield ref


@pytest.fixture(scope="module")
def cluster(module_procs, tmp_path_factory):
    return Cluster(module_procs, demo_model_dir(2), tmp_path_factory.mktemp("prefix")).start()


def _complete(cluster: Cluster, prompt: list[int]) -> dict:
    status, body = http_json(
        f"{cluster.url}/v1/completions", {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}, timeout=120
    )
    assert status == 200, body
    return body


def _generated(tok: Tokenizer, body: dict) -> list[int]:
    return tok.tokenize(body["choices"][0]["text"], add_special=False, parse_special=True)


def test_the_next_turn_reuses_the_conversation_and_matches_the_whole_model(cluster, reference):
    tok, generate = reference
    p1 = tok.tokenize(SYSTEM + "Question: what is a lamp room?\nAnswer:")
    t1 = generate(p1)
    b1 = _complete(cluster, p1)
    assert b1["choices"][0]["text"] == tok.detokenize([t for t in t1 if not tok.is_eog(t)])
    p2 = (
        p1
        + [t for t in t1 if not tok.is_eog(t)]
        + tok.tokenize("\nQuestion: and a gallery?\nAnswer:", add_special=False)
    )
    b2 = _complete(cluster, p2)
    assert b2["choices"][0]["text"] == tok.detokenize([t for t in generate(p2) if not tok.is_eog(t)])
    cached = b2["usage"]["prompt_tokens_details"]["cached_tokens"]
    # Reuse is in whole 64-token blocks of the previous prompt (docs/design.md, "Prefix cache").
    assert cached == len(p1) // 64 * 64 > 0, (cached, len(p1))
    # Streamed, the third turn: the same text as without the cache.
    p3 = p2 + tok.tokenize(" A walkway.\nQuestion: who lit the lamp?\nAnswer:", add_special=False)
    expected = tok.detokenize([t for t in generate(p3) if not tok.is_eog(t)])

    async def stream() -> tuple[str, dict]:
        body = {"prompt": p3, "max_tokens": N_TOKENS, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        text, usage = "", {}
        async with aiohttp.ClientSession() as s, s.post(f"{cluster.url}/v1/completions", json=body) as resp:
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    import json  # noqa: PLC0415

                    obj = json.loads(line[6:])
                    text += "".join(c.get("text") or "" for c in obj.get("choices") or [])
                    usage = obj.get("usage") or usage
        return text, usage

    text, usage = asyncio.run(stream())
    assert text == expected
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(p2) // 64 * 64
    status, metrics = http_json(f"{cluster.url}/metrics")
    assert "coordinator_prefix_cache_hits_total" in str(metrics)


def test_eight_streams_sharing_a_system_prompt_each_get_what_they_get_alone(cluster, reference):
    tok, generate = reference
    system = tok.tokenize(SYSTEM + "Today's visitors ask about the old fog horn. ")
    questions = [f"Question {i}: tell me about keeper number {i}.\nAnswer:" for i in range(8)]
    prompts = [system + tok.tokenize(q, add_special=False) for q in questions]
    _complete(cluster, prompts[0])  # the system prompt is now cached

    async def run_all() -> list[dict]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:

            async def one(p: list[int]) -> dict:
                body = {"prompt": p, "max_tokens": N_TOKENS, "temperature": 0}
                async with s.post(f"{cluster.url}/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    return await resp.json()

            return await asyncio.gather(*(one(p) for p in prompts))

    bodies = asyncio.run(run_all())
    for p, body in zip(prompts, bodies):
        assert body["choices"][0]["text"] == tok.detokenize([t for t in generate(p) if not tok.is_eog(t)])
    shared = len(system) // 64 * 64
    assert sum(b["usage"]["prompt_tokens_details"]["cached_tokens"] >= shared for b in bodies) >= 4
    wait_until(lambda: cluster.live_sequences() == [0, 0], timeout=30, what="only cache entries left")


def test_a_donor_lost_with_its_replica_is_never_used(cluster, reference):
    tok, generate = reference
    p1 = tok.tokenize(SYSTEM + "Question: why are lighthouses white?\nAnswer:")
    _complete(cluster, p1)
    url = cluster.stage_urls[1][0]
    proc = cluster.stage_procs[url]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    cluster.start_stage(url, wait=False)
    wait_ready(url, cluster.stage_procs[url])
    wait_until(lambda: http_json(f"{cluster.url}/readyz")[0] == 200, timeout=60, what="coordinator ready again")
    p2 = p1 + tok.tokenize(" Paint.\nQuestion: and red ones?\nAnswer:", add_special=False)
    b2 = _complete(cluster, p2)
    assert b2["choices"][0]["text"] == tok.detokenize([t for t in generate(p2) if not tok.is_eog(t)])


def test_not_exact_reuses_the_reply_too(module_procs, tmp_path_factory, reference):
    """``prefix_cache_exact: false``: the next turn takes every cached position, the previous reply included (as
    llama-server's cache_prompt), off a block boundary; its rest then runs row by row."""
    tok, generate = reference
    loose = Cluster(
        module_procs,
        demo_model_dir(2),
        tmp_path_factory.mktemp("loose"),
        coordinator_extra={"prefix_cache_exact": False},
    ).start()
    p1 = tok.tokenize(SYSTEM + "Question: what is a fog horn?\nAnswer:")
    reply = [t for t in generate(p1) if not tok.is_eog(t)]  # a first turn has nothing cached: the whole model's
    b1 = _complete(loose, p1)
    assert b1["choices"][0]["text"] == tok.detokenize(reply)
    p2 = p1 + reply + tok.tokenize("\nQuestion: and a lens?\nAnswer:", add_special=False)
    b2 = _complete(loose, p2)
    cached = b2["usage"]["prompt_tokens_details"]["cached_tokens"]
    # Every position the stages hold: the prompt and the reply but its last token (never fed back).
    assert cached >= len(p1) + len(reply) - 1 > len(p1) // 64 * 64, (cached, len(p1), len(reply))
    assert cached % 64, cached  # this test is about a hit off a block boundary: change the prompt if it is not
    assert b2["choices"][0]["finish_reason"] in ("length", "stop") and b2["usage"]["completion_tokens"] > 0
    # A third turn on top of an entry that itself started off a block boundary.
    p3 = p2 + _generated(tok, b2) + tok.tokenize("\nQuestion: who cleaned it?\nAnswer:", add_special=False)
    b3 = _complete(loose, p3)
    assert b3["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(p2)
