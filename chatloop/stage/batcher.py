"""Token-level batching at a stage: forward calls that arrive close together share one ``llama_decode``.

Calls queue up (bounded). The batch loop takes the oldest call, waits up to the batching window for
others, and closes the batch early once it is full or once every sequence expected to call has a call
waiting (nobody else can join, so waiting longer only adds latency). While a decode runs, new calls
simply accumulate and go into the next one. A call that finds the stage idle, nothing queued and nobody else
expected decodes at once from its caller's task, without the batch loop's turn (a lone stream's every step:
`bench_serve.py --checkouts`, 0.824 -> 0.862 x in-process, scripts/README.md "Session 11").

Only batchmates are waited for and merged: calls whose slots join the batch's without another pass over the
weights (``join``). Another micro-batch starts apart (engine/slots.py), and merging two at a stage would cost the
same passes while coupling them at every stage (two streams, two stages, 3 ms window: 9.95 -> 6.78 ms a token).

A sequence is expected to call when it holds KV here and called recently: within a few of the usual intervals
between a sequence's calls. Sequences that hold KV without stepping (the coordinator's prefix-cache entries,
finished sequences not yet released) would otherwise hold every batch for the whole window: with a cache entry
in the stage, one stream's every step waited the window at every stage.

A small step (``batching.inline_max_rows``: every decode step of a few streams) decodes on the event loop's own
thread when the llama.cpp thread is idle: handing it to that thread and back costs two thread switches, which on a
stage pinned to one core are two context switches per token (scripts/README.md, "Session 15"). The event loop then
waits on the decode, as it would wait for its result anyway; once such a step takes ``INLINE_MAX_SECS`` (a model
large enough that the loop would stall health checks and streams for that long), steps go to the thread again.
Only with one llama.cpp thread: ggml then computes on the calling thread alone, while with more the event loop's
thread would lead a second OpenMP team beside the llama.cpp thread's (measured slower: 1B-class model, 2 threads
a stage, 28.6 against 24.0 ms a token).
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from chatloop import step_trace
from chatloop.config import StageBatching
from chatloop.engine.errors import StepRefused
from chatloop.engine.runtime import StageRuntime
from chatloop.engine.slots import runs
from chatloop.protocol.messages import SeqStep
from chatloop.stage.metrics import StageMetrics

log = logging.getLogger(__name__)

EXPECT_INTERVALS = 4.0  # a sequence is expected to call within this many usual intervals of its last call
ACTIVE_FLOOR_SECS = 2.0  # a sequence that called within this long is still being served (draining waits for it)
INTERVAL_SAMPLES = 32  # the usual interval: median of the latest intervals between a sequence's calls
INLINE_MAX_SECS = 0.25  # small steps decode on the event loop's thread only while they take less than this


class QueueFullError(StepRefused):
    """The stage's queue of forward calls is full."""


class CancelledStepError(StepRefused):
    """The call's sequence was released (or the stage stopped) while the call waited."""


@dataclass
class ForwardJob:
    steps: list[SeqStep]
    data: np.ndarray
    future: asyncio.Future
    enqueued: float

    @property
    def n_rows(self) -> int:
        return sum(s.n_tokens for s in self.steps)


class Batcher:
    def __init__(
        self,
        runtime: StageRuntime,
        cfg: StageBatching,
        metrics: StageMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: monotonic seconds (tests pass their own)."""
        self.runtime = runtime
        self._clock = clock
        self.cfg = cfg
        self.metrics = metrics
        self._pending: deque[ForwardJob] = deque()
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()  # no decode running (set whenever ``busy`` is False)
        self._idle.set()
        self._task: asyncio.Task | None = None
        self.busy = False
        self._last_call: dict[int, float] = {}  # sequence -> when its latest call arrived (monotonic seconds)
        self._intervals: deque[float] = deque(maxlen=INTERVAL_SAMPLES)
        self._small_step_secs = 0.0  # how long the latest small step took (``inline_max_rows``)
        self._inline_rows = cfg.inline_max_rows if runtime.options.n_threads == 1 else 0
        self.inline_steps = metrics.counter(
            "worker_inline_steps",
            "Small steps decoded on the event loop's thread (no hand-off to the llama.cpp thread)",
        )

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="stage-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(CancelledStepError("stage shutting down"))
        self._pending.clear()

    async def submit(self, steps: list[SeqStep], data: np.ndarray):
        if len(self._pending) >= self.cfg.max_queue_size:
            raise QueueFullError(f"stage queue full ({self.cfg.max_queue_size} calls waiting)")
        job = ForwardJob(steps, data, asyncio.get_running_loop().create_future(), self._clock())
        self._note_calls(job)
        if not self.busy and not self._pending and self._covers_expected({s.seq_id for s in steps}):
            # NOTE: nothing to wait for and nothing to batch with: decode from the caller's own task. Through the
            # batch loop's task the call would wait for two more turns of the event loop, on every stage, on every
            # step of a lone stream. Calls that arrive meanwhile queue up for the next batch as usual.
            await self._run([job])
            return job.future.result()
        self._pending.append(job)
        self.metrics.queue_depth.set(len(self._pending))
        self._arrived.set()
        return await job.future

    def cancel(self, seq_ids: set[int]) -> int:
        """Fail queued calls that carry any of ``seq_ids``; returns how many."""
        hit = [j for j in self._pending if any(s.seq_id in seq_ids for s in j.steps)]
        for job in hit:
            self._pending.remove(job)
            if not job.future.done():
                job.future.set_exception(CancelledStepError("sequence cancelled"))
        self.metrics.queue_depth.set(len(self._pending))
        return len(hit)

    def _note_calls(self, job: ForwardJob) -> None:
        for st in job.steps:
            last = self._last_call.get(st.seq_id)
            if last is not None:
                self._intervals.append(job.enqueued - last)
            self._last_call[st.seq_id] = job.enqueued
        if len(self._last_call) > 2 * self.runtime.options.max_sequences:
            live = self.runtime.live_ids()
            self._last_call = {k: v for k, v in self._last_call.items() if k in live or v == job.enqueued}

    def _horizon(self) -> float:
        """How long after its last call a sequence is still expected to call (seconds)."""
        return EXPECT_INTERVALS * statistics.median(self._intervals) if self._intervals else math.inf

    def serving(self) -> bool:
        """Work is queued or running, or a sequence holding KV here is still being served: it called within the
        usual intervals (at least ``ACTIVE_FLOOR_SECS`` ago). Sequences that hold KV without stepping (the
        coordinators' prefix-cache entries) are not: a draining stage does not wait for them."""
        if self.busy or self._pending:
            return True
        horizon = max(self._horizon(), ACTIVE_FLOOR_SECS) if self._intervals else ACTIVE_FLOOR_SECS
        return bool(expected_callers(self.runtime.live_ids(), self._last_call, self._clock(), horizon))

    def _covers_expected(self, waiting: set[int] | None = None) -> bool:
        """Every batchmate expected to call has a call waiting: the sequences expected to call whose slots join
        those of the batch's first call without another pass over the weights (``join``). ``waiting``: the
        sequences of the call to run (default: the queued calls', the first one's slots as the batch's)."""
        if waiting is None:
            first = {s.seq_id for s in self._pending[0].steps}
            waiting = {s.seq_id for j in self._pending for s in j.steps}
        else:
            first = waiting
        expected = expected_callers(self.runtime.live_ids(), self._last_call, self._clock(), self._horizon()) - waiting
        slots = self.runtime.stats.slots
        batch = {slots[q] for q in first if q in slots}
        return not any(join(batch, {slots[q]}) for q in expected if q in slots)

    def _take(self) -> list[ForwardJob]:
        """The queued calls of the next decode: the oldest, and those after it that fit and ``join`` its slots."""
        jobs: list[ForwardJob] = []
        seqs: set[int] = set()
        taken: set[int] = set()  # their slots
        rows = 0
        slots = self.runtime.stats.slots
        while self._pending:
            job = self._pending[0]
            ids = {s.seq_id for s in job.steps}
            mine = {slots[q] for q in ids if q in slots}
            if jobs and (
                ids & seqs
                or len(seqs) + len(ids) > self.cfg.max_batch_size
                or rows + job.n_rows > self.runtime.options.n_batch
                or not merges(taken, mine)
            ):
                break
            jobs.append(self._pending.popleft())
            seqs |= ids
            taken |= mine
            rows += job.n_rows
        return jobs

    async def _loop(self) -> None:
        window = self.cfg.batching_window_ms / 1000.0
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._pending[0].enqueued + window
            while (
                window > 0
                and not self._covers_expected()
                and sum(len(j.steps) for j in self._pending) < self.cfg.max_batch_size
            ):
                left = deadline - self._clock()
                if left <= 0:
                    self.metrics.window_expired.inc()
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    self.metrics.window_expired.inc()
                    break
            while self.busy:  # a caller decoding from its own task (submit)
                await self._idle.wait()
            jobs = self._take()
            self.metrics.queue_depth.set(len(self._pending))
            if jobs:
                await self._run(jobs)

    async def _run(self, jobs: list[ForwardJob]) -> None:
        now = self._clock()
        for job in jobs:
            self.metrics.queue_time.observe(now - job.enqueued)
        steps = [s for j in jobs for s in j.steps]
        self.metrics.batch_size.observe(len(steps))
        self.busy = True
        self._idle.clear()
        try:
            try:
                result = await self._forward(steps, [j.data for j in jobs])
            except StepRefused as exc:
                if len(jobs) == 1:
                    _fail(jobs[0], exc)
                    return
                # One call's bad step must not fail its neighbours: run them one by one.
                for job in jobs:
                    try:
                        _deliver([job], await self._forward(job.steps, [job.data]))
                    except Exception as exc2:  # noqa: BLE001 - reported to that call's client
                        _fail(job, exc2)
                return
            except Exception as exc:  # noqa: BLE001 - a decode failure fails every call in the batch
                log.exception("forward failed")
                for job in jobs:
                    _fail(job, exc)
                return
            _deliver(jobs, result)
        finally:
            self.busy = False
            self._idle.set()

    async def _forward(self, steps: list[SeqStep], parts: list[np.ndarray]):
        data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        start = time.perf_counter()
        passes = self.runtime.stats.ubatch_count
        small = len(data) <= self._inline_rows
        try:
            if step_trace.ENABLED:
                step_trace.mark("handoff")
            ran, result = False, None
            if small and self._small_step_secs < INLINE_MAX_SECS:
                ran, result = self.runtime.run_here_if_idle(self.runtime.forward, steps, data)
            if ran:
                self.inline_steps.inc()
            else:
                result = await self.runtime.call(self.runtime.forward, steps, data)
        finally:
            self.metrics.ubatches.inc(self.runtime.stats.ubatch_count - passes)
        took = time.perf_counter() - start
        if small:
            self._small_step_secs = took
        self.metrics.forward_duration.observe(took)
        return result


def join(batch: set[int], slots: set[int]) -> bool:
    """Sequences at ``slots`` join a batch at ``batch`` without another pass over the weights: llama.cpp puts a
    run of consecutive slots into one ubatch (engine/slots.py), so they must fall inside or next to its runs.

    NOTE: calls that would not join are decoded apart, and the window does not wait for them: with
    ``pipeline_depth`` above 1 they are another micro-batch (it starts apart, slots.pick_slot), and merging two
    micro-batches at a stage would cost the same passes while making each wait for the other at every stage,
    which ends the pipelining (scripts/README.md "Session 11": two streams, two stages)."""
    return bool(batch) and runs(batch | slots) <= runs(batch)


def merges(taken: set[int], slots: set[int]) -> bool:
    """A queued call at ``slots`` goes into the decode of calls at ``taken``: both at known slots that ``join``, or
    both of sequences new to the stage (they get slots next to each other). A new micro-batch's first call is not
    merged into a running one's decode, so that it starts apart (slots.pick_slot)."""
    if taken and slots:
        return join(taken, slots)
    return not taken and not slots


def expected_callers(live: Iterable[int], last_call: dict[int, float], now: float, horizon: float) -> set[int]:
    """The sequences holding KV (``live``) that called within ``horizon`` seconds of ``now``, or have not called
    yet (a sequence new to the stage calls first)."""
    return {s for s in live if now - last_call.get(s, now) <= horizon}


def _fail(job: ForwardJob, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)


def _deliver(jobs: list[ForwardJob], result) -> None:
    if isinstance(result, np.ndarray):
        offset = 0
        for job in jobs:
            n = job.n_rows
            if not job.future.done():
                job.future.set_result(result[offset : offset + n])
            offset += n
        return
    by_seq: dict[int, list] = {}
    for t in result:  # a verified draft gives a sequence several tokens, in order
        by_seq.setdefault(t.seq_id, []).append(t)
    for job in jobs:
        if not job.future.done():
            job.future.set_result([t for s in job.steps for t in by_seq.get(s.seq_id, ())])
