"""Continuous batching with real processes: concurrency does not change greedy output, overload is refused
cleanly, cancellations leak nothing. In the star data plane (``topology: star``), so that it stays covered now that
the chain is the default (tests/test_serving.py and tests/test_chain_serving.py run the chain)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest

from chatloop.demo import demo_model_dir
from chatloop.protocol.frames import decode_frame, encode_frame
from chatloop.protocol.messages import step_to_wire
from tests.cluster_harness import Cluster, http_json
from tests.waiting import wait_until

STAR = {"topology": "star"}
PROMPTS = [
    ("The capital of France is", 12),
    ("def add(a, b):", 30),
    ("Once upon a time", 45),
    ("1, 2, 3, 4,", 20),
    ("The quick brown fox", 8),
    ("In 1492, Columbus", 36),
    ("Water boils at", 16),
    ("My favourite food is", 50),
    ("import numpy as np\n", 24),
    ("The meaning of life is", 40),
    ("Roses are red,", 18),
    ("A haiku about the sea:\n", 33),
    ("Translate to French: cheese ->", 10),
    ("Step 1: open the door. Step 2:", 28),
    ("Q: What is 2+2?\nA:", 6),
    ("Hello, my name is", 60),
]


@pytest.fixture(scope="module")
def cluster(module_procs, tmp_path_factory):
    return Cluster(module_procs, demo_model_dir(2), tmp_path_factory.mktemp("batching"), coordinator_extra=STAR).start()


async def _complete(session, url, prompt, max_tokens, stream=False, first: asyncio.Event | None = None):
    """(status, body) of a greedy request; streamed: (status, text), setting ``first`` at the first token."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    async with session.post(f"{url}/v1/inference" if not stream else f"{url}/v1/completions", json=body) as resp:
        if not stream:
            return resp.status, await resp.json()
        text = []
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                text.append(json.loads(line[6:])["choices"][0]["text"])
                if first is not None:
                    first.set()
        return resp.status, "".join(text)


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_greedy_equals_alone(cluster):
    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            alone = [await _complete(s, cluster.url, p, n) for p, n in PROMPTS]
            together = await asyncio.gather(*(_complete(s, cluster.url, p, n) for p, n in PROMPTS))
            return alone, together

    alone, together = _run(main())
    for (p, _), (sa, a), (st, t) in zip(PROMPTS, alone, together, strict=True):
        assert sa == st == 200
        assert t["tokens"] == a["tokens"], p
    # The stages really batched: some decode carried more than one sequence.
    with __import__("urllib.request").request.urlopen(f"{cluster.stage_urls[0][0]}/metrics") as resp:
        metrics = resp.read().decode()
    count_1 = float(
        next(line.split()[-1] for line in metrics.splitlines() if line.startswith('worker_batch_size_bucket{le="1.0"'))
    )
    total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("worker_batch_size_count")))
    assert total > count_1, "no decode ever held more than one sequence"
    # The coordinator releases a finished sequence in the background, right after answering: allow it a moment.
    wait_until(lambda: cluster.live_sequences() == [0, 0], what="every sequence released")


def test_queue_overflow_503_and_accepted_complete(procs, tmp_path):
    small = Cluster(
        procs,
        demo_model_dir(2),
        tmp_path,
        coordinator_extra={**STAR, "batching": {"max_batch_size": 2, "max_queue_size": 2}},
    ).start()

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            return await asyncio.gather(*(_complete(s, small.url, p, n) for p, n in PROMPTS[:10]))

    results = _run(main())
    statuses = [st for st, _ in results]
    assert statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503}
    for st, body in results:
        if st == 200:
            assert body["finish_reason"] in ("length", "stop")
        else:
            assert body["error"]["type"] == "unavailable"
    assert statuses.count(200) >= 4  # two running + two queued at the very least


def test_stage_queue_full_gives_503_at_once(procs, tmp_path):
    tiny = Cluster(
        procs,
        demo_model_dir(2),
        tmp_path,
        stage_extra={"batching": {"max_queue_size": 1, "max_batch_size": 1, "batching_window_ms": 0}},
    )
    tiny.start_stages()
    url = tiny.stage_urls[0][0]

    async def main():
        async with aiohttp.ClientSession() as s:

            async def one(i):
                toks = np.arange(100, 164, dtype=np.int32)
                frame = encode_frame({"kind": "forward", "steps": [step_to_wire(1000 + i, 0, len(toks))]}, toks)
                async with s.post(f"{url}/v1/forward", data=frame) as resp:
                    return resp.status, resp.headers.get("Retry-After"), await resp.read()

            return await asyncio.gather(*(one(i) for i in range(12)))

    results = _run(main())
    codes = [r[0] for r in results]
    assert 503 in codes and 200 in codes, codes
    for status, retry, body in results:
        if status == 503:
            assert retry is not None and json.loads(body)["error"]["code"] == "queue_full"
        else:
            header, hidden = decode_frame(body)
            assert hidden.shape == (64, 576)
    http_json(f"{url}/v1/release", {"seqs": [1000 + i for i in range(12)]})
    assert http_json(f"{url}/v1/info")[1]["live_sequences"] == 0


def test_cancel_under_load_leaks_nothing(cluster):
    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            keep = [asyncio.create_task(_complete(s, cluster.url, p, 40, stream=True)) for p, _ in PROMPTS[:4]]
            started = [asyncio.Event() for _ in range(6)]
            doomed = [
                asyncio.create_task(_complete(s, cluster.url, "1, 2, 3, 4, 5,", 300, stream=True, first=e))
                for e in started
            ]
            # Cancel mid-generation: once every doomed stream has its first token (300 tokens each keep them
            # going long after), however slow the machine is.
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
            for t in doomed:
                t.cancel()
            await asyncio.gather(*doomed, return_exceptions=True)
            return await asyncio.gather(*keep)

    kept = _run(main())
    assert all(st == 200 for st, _ in kept)
    wait_until(lambda: cluster.live_sequences() == [0, 0], what="every sequence released")
    _, view = http_json(f"{cluster.url}/v1/cluster")
    assert view["active"] == 0 and view["waiting"] == 0
