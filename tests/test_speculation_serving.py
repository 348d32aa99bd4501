"""Speculative decoding served by real stage and coordinator processes (real llama.cpp, the demo model).

Greedy output with prompt lookup equals the whole model's for every lookahead 1..8, on 2 and 3 stages, for one
stream and eight concurrent ones (streamed and not, each carrying its own number of proposed rows); logprobs,
stop strings, grammars and seeded sampling are the same with and without speculation; a copy-heavy prompt gets
proposals accepted (docs/design.md, "Speculative decoding"). Failover: tests/test_speculation_failover.py.
"""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest

from chatloop.demo import demo_gguf, demo_model_dir
from tests.cluster_harness import Cluster, http_json
from tests.reference import whole_model_greedy

DOC = (
    "The Roman Empire was the post-Republican period of ancient Rome. As a polity it included large territorial "
    "holdings around the Mediterranean Sea in Europe, North Africa, and Western Asia, ruled by emperors. From the "
    "accession of Caesar Augustus as the first Roman emperor to the military anarchy of the 3rd century, it was a "
    "Principate with Italia as the metropole of its provinces."
)
# Output that repeats its input: what prompt lookup is for.
COPY_PROMPTS = [
    f"Text: {DOC}\nThe same text, copied exactly:\nText: The Roman Empire",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef add(a, b):",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Monday, Tuesday,",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3,",
]
FREE_PROMPTS = ["Once upon a time, in a land far away,", "The capital of France is", "Explain how rain forms.", "Hi"]
N_TOKENS = 48
# NOTE: min_tokens: proposals whatever the policy's cost fit says, so that every run verifies drafts (of uneven
# lengths across sequences) however busy the machine is; the policy itself: tests/test_speculation_policy.py.
SPECULATIVE = {"speculative": {"method": "ngram", "max_tokens": 8, "min_tokens": 2}}
OFF = {"speculative": {"method": "off"}}


@pytest.fixture(scope="module")
def reference():
    with whole_model_greedy(N_TOKENS) as ref:
        yield ref


@pytest.fixture(scope="module")
def cluster2(module_procs, tmp_path_factory):
    """Prompt lookup by default; requests may ask for the draft model (the demo model drafting for itself: the same
    vocabulary, and its greedy proposals are all accepted)."""
    spec = {"speculative": {**SPECULATIVE["speculative"], "draft_model": str(demo_gguf())}}
    return Cluster(module_procs, demo_model_dir(2), tmp_path_factory.mktemp("c2"), coordinator_extra=spec).start()


@pytest.fixture(scope="module")
def cluster3(module_procs, model3, tmp_path_factory):
    return Cluster(module_procs, model3, tmp_path_factory.mktemp("c3"), coordinator_extra=SPECULATIVE).start()


@pytest.fixture(scope="module")
def cluster3_chain(module_procs, model3, tmp_path_factory):
    """The same through the chain data plane: the stages pass the draft rows on, the last one verifies them."""
    extra = {**SPECULATIVE, "topology": "chain"}
    return Cluster(module_procs, model3, tmp_path_factory.mktemp("c3c"), coordinator_extra=extra).start()


def _spec_view(cluster: Cluster) -> dict:
    status, view = http_json(f"{cluster.url}/v1/cluster")
    assert status == 200, view
    return view["speculative"]


def _accepted_metric(cluster: Cluster, source: str) -> float:
    status, text = http_json(f"{cluster.url}/metrics")
    m = re.search(rf'^coordinator_speculative_accepted_tokens_total\{{source="{source}"\}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize(
    ("which", "method"),
    [("cluster2", "ngram"), ("cluster3", "ngram"), ("cluster3_chain", "ngram"), ("cluster2", "draft")],
)
def test_greedy_equals_whole_model_for_every_lookahead(which, method, request, reference):
    cluster = request.getfixturevalue(which)
    tok, generate = reference
    before = _spec_view(cluster)["accepted_tokens"]
    prompt = COPY_PROMPTS[0] if method == "ngram" else FREE_PROMPTS[0]
    expected = generate(tok.tokenize(prompt))
    for k in range(1, 9):
        spec = {"method": method, "max_tokens": k}
        body = {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "speculative": spec}
        status, out = http_json(f"{cluster.url}/v1/inference", body)
        assert status == 200, out
        assert out["tokens"] == expected, k
        if k > 1 and method == "ngram":  # the same prompt again: the prefix cache serves its whole blocks
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    status, out = http_json(f"{cluster.url}/v1/inference", {**body, **OFF})
    assert out["tokens"] == expected
    view = _spec_view(cluster)
    assert view["accepted_tokens"] > before, view  # the copy-heavy prompt (or the draft) had proposals accepted
    assert view["sources"][method]["accepted_tokens"] > 0
    assert 0 < view["acceptance_rate"] <= 1 and view["mean_accepted_length"] > 0
    assert sum(_accepted_metric(cluster, s) for s in view["sources"]) == view["accepted_tokens"]


async def _request(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    """A completion, streamed or not: text, per-token logprobs and finish reason."""
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if not body.get("stream"):
            out = await resp.json()
            assert resp.status == 200, out
            choice = out["choices"][0]
            lp = choice.get("logprobs") or {}
            return {"text": choice["text"], "logprobs": lp.get("token_logprobs"), "finish": choice["finish_reason"]}
        text, logprobs, finish = [], [], None
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            choice = event["choices"][0]
            text.append(choice["text"])
            logprobs += (choice.get("logprobs") or {}).get("token_logprobs") or []
            finish = choice["finish_reason"] or finish
        return {"text": "".join(text), "logprobs": logprobs or None, "finish": finish}


def _concurrently(url: str, bodies: list[dict]) -> list[dict]:
    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            return await asyncio.gather(*(_request(session, url, b) for b in bodies))

    return asyncio.run(main())


@pytest.mark.parametrize("which", ["cluster2", "cluster3"])
def test_eight_concurrent_streams_equal_runs_without_speculation(which, request):
    """Eight sequences in the micro-batches at once, each with its own number of proposed rows (copying ones
    many, free text few or none), half of them streamed: the same text as without speculation."""
    cluster = request.getfixturevalue(which)
    prompts = COPY_PROMPTS + FREE_PROMPTS
    bodies = [
        {"prompt": p, "max_tokens": N_TOKENS, "temperature": 0, "stream": i % 2 == 0, "logprobs": 1}
        for i, p in enumerate(prompts)
    ]
    before = _spec_view(cluster)["proposed_tokens"]
    with_spec = _concurrently(cluster.url, bodies)
    assert _spec_view(cluster)["proposed_tokens"] > before
    without = _concurrently(cluster.url, [{**b, **OFF} for b in bodies])
    for got, want, prompt in zip(with_spec, without, prompts):
        assert got["text"] == want["text"], prompt
        assert got["finish"] == want["finish"], prompt
        assert got["logprobs"] == want["logprobs"], prompt  # logits bit-exact: the same log-probabilities


def test_stop_strings_grammar_and_seeded_sampling_unchanged(cluster2):
    url = cluster2.url
    cases = [
        # A stop string inside a run of accepted proposals: the text ends before it, nothing after it leaks.
        {"prompt": COPY_PROMPTS[2], "max_tokens": 40, "temperature": 0, "stop": ["Friday"]},
        {"prompt": COPY_PROMPTS[3], "max_tokens": 40, "temperature": 0, "stop": [" 9,"], "logprobs": 3},
        # A grammar: every proposal is checked by the grammar sampler as the stage's own pick would be.
        {"prompt": COPY_PROMPTS[3], "max_tokens": 30, "temperature": 0, "grammar": 'root ::= (" " [0-9]+ ",")+'},
        # Seeded sampling: a proposal is kept only when the stage's own seeded draw picks it.
        {"prompt": COPY_PROMPTS[0], "max_tokens": 40, "temperature": 0.7, "seed": 11},
        {"prompt": COPY_PROMPTS[1], "max_tokens": 40, "temperature": 1.0, "seed": 5, "top_k": 20, "stream": True},
    ]
    stopped = 0
    for body in cases:
        (with_spec,) = _concurrently(url, [body])
        (without,) = _concurrently(url, [{**body, **OFF}])
        assert with_spec == without, body
        if "stop" in body:
            assert body["stop"][0] not in with_spec["text"]
            stopped += with_spec["finish"] == "stop"
        if "grammar" in body:
            assert re.fullmatch(r"( [0-9]+,)*( [0-9]*)?", with_spec["text"]), with_spec
    assert stopped  # a stop string met inside the copied text
