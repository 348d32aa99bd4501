"""Closed-loop load: many clients, each sending its next request when the previous one ends, and the summary
of a run (throughput, TTFT and inter-token latency percentiles, CPU cost per token)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from benchlib.client import StreamResult, stream_completion
from benchlib.stats import cpu_seconds, percentile

log = logging.getLogger("bench")


@dataclass
class LoadResult:
    results: list[StreamResult]
    wall: float  # seconds from the first request sent to the last chunk received
    cpu: float = float("nan")  # CPU seconds the serving processes used meanwhile (user + system)

    def summary(self) -> dict:
        ok = [r for r in self.results if not r.error]
        tokens = sum(r.tokens for r in ok)
        ttfts = [r.ttft for r in ok if r.chunk_times]
        gaps = [g for r in ok for g in r.gaps()]
        return {
            "requests": len(self.results),
            "errors": len(self.results) - len(ok),
            "tokens": tokens,
            "tok_s": tokens / self.wall if self.wall > 0 else float("nan"),
            "ttft_p50_ms": 1000 * percentile(ttfts, 50),
            "ttft_p95_ms": 1000 * percentile(ttfts, 95),
            "itl_p50_ms": 1000 * percentile(gaps, 50),
            "itl_p95_ms": 1000 * percentile(gaps, 95),
            "wall_s": self.wall,
            # CPU cost per token: steadier than tokens/s on a shared machine (spinning threads count as cost).
            "cpu_ms_per_tok": 1000 * self.cpu / tokens if tokens else float("nan"),
        }


class UniquePrompts:
    """Fixed texts taken round-robin, each request made unique by a leading serial number.

    NOTE: llama-server's slots keep the KV cache of their last prompt and reuse the common prefix of the next
    one (``cache_prompt``, on by default): repeating the same prompts would let it skip prefill entirely while
    ChatLoop and the in-process baseline compute every prompt. A distinct first token defeats that reuse."""

    def __init__(self, texts: list[str], tokenize) -> None:
        self.texts = texts
        self.tokenize = tokenize
        self.count = 0

    def __call__(self) -> list[int]:
        text = self.texts[self.count % len(self.texts)]
        self.count += 1
        return self.tokenize(f"{self.count}. {text}")


async def run_load(
    url: str, prompts, n_requests: int, concurrency: int, max_tokens: int, pids: list[int] = ()
) -> LoadResult:
    """Closed loop: ``concurrency`` clients, each sending its next request when the previous one ends, until
    ``n_requests`` have been served; ``prompts()`` gives each request's token ids."""
    import aiohttp  # noqa: PLC0415

    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for _ in range(n_requests):
        queue.put_nowait(prompts())
    results: list[StreamResult] = []
    # NOTE: one connection per request: llama-server closes a connection after a streamed reply, and a
    # reused one then fails ("Can not write request body"). Both servers get the same treatment.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while True:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await stream_completion(session, url, prompt, max_tokens))

        cpu0 = cpu_seconds(pids) if pids else 0.0
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        end = max([r.done for r in results] + [start])
        cpu = cpu_seconds(pids) - cpu0 if pids else float("nan")
    errors = [r.error for r in results if r.error]
    if errors:
        log.warning("%d of %d requests failed, first: %s", len(errors), len(results), errors[0])
    return LoadResult(results, end - start, cpu)


def sequential_load(engine, prompts, n_requests: int, concurrency: int, max_tokens: int) -> LoadResult:
    """The same closed-loop workload served one request after another by ``engine`` (an ``InProcess``).

    Requests run back to back; each one's arrival is when its client's previous request ended (the first
    ``concurrency`` arrive at the start), so TTFT includes the wait a one-at-a-time server imposes."""
    start = time.perf_counter()
    cpu0 = time.process_time()  # this process: the model's threads (the client is idle meanwhile)
    results = []
    for i in range(n_requests):
        r = engine.generate(prompts(), max_tokens)
        r.sent = start if i < concurrency else results[i - concurrency].done
        results.append(r)
    return LoadResult(results, max(r.done for r in results) - start, time.process_time() - cpu0)
