"""The stage batcher's window: it waits for sequences expected to call, not for every sequence holding KV.

A prefix-cache entry (or a finished sequence not yet released) holds KV in the stage but never steps again; when
the batcher waited for every sequence holding KV, a single stream beside a cache entry waited the whole window
at every stage on every step. Here the runtime is a stand-in (the batcher only asks it which sequences hold KV)
and the clock is the test's own, so what the batcher decides does not depend on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np

from chatloop import config
from chatloop.config import StageBatching
from chatloop.engine.worker_thread import WorkerThread
from chatloop.protocol.messages import SeqStep
from chatloop.stage import batcher as batcher_module
from chatloop.stage.batcher import ACTIVE_FLOOR_SECS, EXPECT_INTERVALS, Batcher, expected_callers
from chatloop.stage.metrics import StageMetrics


class FakeRuntime:
    """Holds KV for every sequence it has computed, each in the next free slot; returns one zero row per input
    row."""

    def __init__(self) -> None:
        self.options = SimpleNamespace(n_batch=512, max_sequences=16, n_threads=1)
        self.stats = SimpleNamespace(ubatch_count=0, slots={})
        self.live: set[int] = set()
        self.calls: list[list[int]] = []
        self.hold: asyncio.Event | None = None

    def live_ids(self) -> frozenset[int]:
        return frozenset(self.live)

    def forward(self, steps: list[SeqStep], data: np.ndarray) -> np.ndarray:
        self.calls.append([s.seq_id for s in steps])
        self.live |= {s.seq_id for s in steps}
        for s in steps:
            self.stats.slots.setdefault(s.seq_id, len(self.stats.slots))
        return np.zeros_like(data)

    def run_here_if_idle(self, fn, *args):
        return False, None  # every decode through ``call``, which a test may hold

    async def call(self, fn, *args):
        if self.hold is not None and not self.calls:
            await self.hold.wait()  # the first decode takes long
        return fn(*args)

    def hold_first_decode(self) -> asyncio.Event:
        """Make the first decode last until the returned event is set."""
        self.hold = asyncio.Event()
        return self.hold


def one_row(*seqs: int):
    """A forward call of one row for each of ``seqs`` (at position 0)."""
    return [SeqStep(seq_id=s, pos=0, n_tokens=1) for s in seqs], np.zeros((len(seqs), 4), np.float32)


async def settle() -> None:
    """Let every task that can run, run (the fake decodes never block the loop)."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_expected_callers() -> None:
    last = {1: 10.0, 2: 5.0}
    assert expected_callers({1, 2, 3}, last, now=10.5, horizon=2.0) == {1, 3}  # 3 has not called: it will
    assert expected_callers({1, 2}, last, now=10.5, horizon=6.0) == {1, 2}
    assert expected_callers(set(), last, now=10.5, horizon=6.0) == set()


def test_a_sequence_that_stopped_calling_stops_holding_the_window() -> None:
    """Sequences 1-3 step together, then only 1 goes on (2 and 3 became cache entries). Its steps wait the window
    for them only while they are within EXPECT_INTERVALS of the usual interval since their last call."""
    runtime = FakeRuntime()
    metrics = StageMetrics("0", "test")
    now = [0.0]
    # A real window of 20 ms: a wait for it ends the test's step, not the test.
    batcher = Batcher(runtime, StageBatching(batching_window_ms=20.0), metrics, clock=lambda: now[0])

    def expired() -> int:
        return int(metrics.window_expired._value.get())

    async def step(*seq_ids: int) -> None:
        steps = [SeqStep(seq_id=s, pos=0, n_tokens=1) for s in seq_ids]
        await asyncio.wait_for(batcher.submit(steps, np.zeros((len(steps), 4), dtype=np.float32)), 30)

    async def main() -> list[int]:
        batcher.start()
        try:
            await step(1, 2, 3)  # t = 0: nothing held yet, runs at once
            seen = [expired()]
            for t in range(1, 8):  # one call a second from sequence 1 alone
                now[0] = float(t)
                await step(1)
                seen.append(expired())
            now[0] = 8.0
            await step(2)  # sequence 2 comes back (its KV was reused): expected again
            now[0] = 9.0
            await step(1)
            seen.append(expired())
            return seen
        finally:
            await batcher.stop()

    seen = asyncio.run(main())
    # Intervals of 1 s: sequences 2 and 3 are expected up to 4 s after their last call (t = 0), so the calls at
    # t = 1..4 each wait the window for them and those from t = 5 on do not. Sequence 2's call at t = 8 waits for
    # sequence 1 (which calls every second), and 1's call at t = 9 for 2 again: two more.
    assert EXPECT_INTERVALS == 4.0
    assert seen == [0, 1, 2, 3, 4, 4, 4, 4, 6]
    assert runtime.calls == [[1, 2, 3], *[[1]] * 7, [2], [1]]


def test_calls_arriving_within_the_window_share_a_decode() -> None:
    """The window still does its job: a call waits for the expected sequences and they join its decode."""
    runtime = FakeRuntime()
    metrics = StageMetrics("0", "test")
    now = [0.0]
    batcher = Batcher(runtime, StageBatching(batching_window_ms=60_000.0), metrics, clock=lambda: now[0])

    def rows(*steps: tuple[int, int]):
        return [SeqStep(seq_id=s, pos=pos, n_tokens=1) for s, pos in steps], np.zeros((len(steps), 4), np.float32)

    async def main() -> None:
        batcher.start()
        try:
            await batcher.submit(*rows((1, 0), (2, 0)))
            now[0] = 1.0
            await batcher.submit(*rows((1, 1), (2, 1)))
            now[0] = 2.0
            # 2 called 1 s ago with calls 1 s apart: 1's call waits for it (the window is a minute)
            first = asyncio.ensure_future(batcher.submit(*rows((1, 2))))
            for _ in range(10):
                await asyncio.sleep(0)
            assert batcher.depth == 1 and not first.done()
            await asyncio.wait_for(asyncio.gather(first, batcher.submit(*rows((2, 2)))), 30)
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert runtime.calls == [[1, 2], [1, 2], [1, 2]]
    assert metrics.window_expired._value.get() == 0


def test_calls_arriving_during_a_lone_call_wait_for_it_and_share_the_next_decode() -> None:
    """A lone call decodes from its caller's task (nothing to wait for); calls that arrive while it runs must not
    start a decode beside it (one context, one decode at a time) and go together into the next one."""
    runtime = FakeRuntime()
    batcher = Batcher(runtime, StageBatching(batching_window_ms=0.0), StageMetrics("0", "test"))

    async def main() -> None:
        release = runtime.hold_first_decode()
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(*one_row(1)))
            await settle()
            assert batcher.busy and batcher.depth == 0  # decoding, not queued
            others = asyncio.gather(batcher.submit(*one_row(2)), batcher.submit(*one_row(3)))
            await settle()
            assert runtime.calls == [] and batcher.depth == 2  # they wait: no second decode while the first runs
            release.set()
            await asyncio.wait_for(asyncio.gather(first, others), 30)
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert runtime.calls == [[1], [2, 3]]


def test_another_micro_batch_is_neither_waited_for_nor_merged() -> None:
    """Sequences whose slots are apart (two micro-batches: slots.pick_slot starts the second one apart) would cost
    a pass each in one decode: a call does not wait the window for the other group, and calls of both groups that
    are queued together are decoded apart, so that neither micro-batch waits for the other at every stage."""
    runtime = FakeRuntime()
    runtime.live = {1, 2, 3, 5}
    runtime.stats.slots.update({1: 0, 3: 1, 5: 4, 2: 8})  # group {1, 3} at 0-1, 5 at 4, 2 at 8
    # Every live sequence is expected to call (no intervals seen yet), the window is a minute.
    batcher = Batcher(runtime, StageBatching(batching_window_ms=60_000.0), StageMetrics("0", "test"))

    async def main() -> None:
        release = runtime.hold_first_decode()
        batcher.start()
        try:
            busy = asyncio.ensure_future(batcher.submit(*one_row(5)))  # 5 has no batchmate: decodes at once
            await settle()
            assert batcher.busy
            group = asyncio.ensure_future(batcher.submit(*one_row(1, 3)))
            other = asyncio.ensure_future(batcher.submit(*one_row(2)))
            await settle()
            release.set()
            await settle()
            # {1, 3} did not wait for 2 (a minute's window), nor was 2 merged into its decode.
            assert busy.done() and group.done() and other.done()
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert runtime.calls == [[5], [1, 3], [2]]


def test_serving_ends_when_the_sequences_left_stop_calling() -> None:
    """A draining stage waits while work is queued or a sequence is still being served, not for sequences that
    only hold KV (a coordinator's prefix-cache entries): a stopped coordinator never releases those."""
    runtime = FakeRuntime()
    now = [0.0]
    batcher = Batcher(runtime, StageBatching(batching_window_ms=0.0), StageMetrics("0", "test"), clock=lambda: now[0])

    async def main() -> None:
        batcher.start()
        assert not batcher.serving()  # nothing here at all
        for _ in range(3):  # sequence 1 steps every 10 ms
            await batcher.submit(*one_row(1))
            now[0] += 0.010
        assert batcher.serving()  # it is being served: its next call is due
        now[0] += ACTIVE_FLOOR_SECS / 2
        assert batcher.serving()  # a gap below the floor: a slow hop elsewhere, still served
        now[0] += ACTIVE_FLOOR_SECS
        assert runtime.live_ids() == {1} and not batcher.serving()  # it holds KV but stopped calling
        await batcher.stop()

    asyncio.run(main())


class ThreadedRuntime(FakeRuntime):
    """The stand-in on a real worker thread; its forward notes the thread it ran on and may take a while."""

    def __init__(self) -> None:
        super().__init__()
        self.worker = WorkerThread("decode-test")
        self.threads: list[str] = []
        self.slow: set[int] = set()  # sequences whose steps take INLINE_MAX_SECS

    def forward(self, steps, data):
        self.threads.append(threading.current_thread().name)
        if any(s.seq_id in self.slow for s in steps):
            time.sleep(batcher_module.INLINE_MAX_SECS)
        return super().forward(steps, data)

    def run_here_if_idle(self, fn, *args):
        return self.worker.run_here_if_idle(fn, *args)

    async def call(self, fn, *args):
        return await self.worker.call(fn, *args)


def test_small_steps_decode_on_the_event_loops_thread_while_they_are_quick(monkeypatch) -> None:
    """A step of at most inline_max_rows rows runs on the event loop's thread (no hand-off); a bigger one, and small
    ones after a small step took INLINE_MAX_SECS (a model that would stall the loop), go to the llama.cpp thread;
    once a small step is quick again, they come back."""
    monkeypatch.setattr(batcher_module, "INLINE_MAX_SECS", 0.05)
    runtime = ThreadedRuntime()
    metrics = StageMetrics("0", "test")
    batcher = Batcher(runtime, StageBatching(batching_window_ms=0.0, inline_max_rows=2), metrics)

    async def main() -> str:
        batcher.start()
        try:
            await batcher.submit(*one_row(1))  # small, quick: here
            await batcher.submit(*one_row(1, 2, 3))  # 3 rows: the thread
            runtime.slow = {4}
            await batcher.submit(*one_row(4))  # small but slow: here, once
            await batcher.submit(*one_row(1))  # the thread (and quick)
            await batcher.submit(*one_row(2))  # here again
            return threading.current_thread().name
        finally:
            await batcher.stop()
            runtime.worker.shutdown()

    here = asyncio.run(main())
    assert runtime.threads == [here, "decode-test", here, "decode-test", here]
    assert metrics.registry.get_sample_value("worker_inline_steps_total", metrics.labels) == 3


def test_a_small_step_waits_for_a_call_already_on_the_llama_thread() -> None:
    """A release (or any call) running on the llama.cpp thread: a small step must not run beside it on the event
    loop's thread; it goes to that thread, after the call."""
    runtime = ThreadedRuntime()
    batcher = Batcher(runtime, StageBatching(batching_window_ms=0.0), StageMetrics("0", "test"))
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow_release() -> None:
        started.set()
        release.wait(5)
        order.append("release")

    async def main() -> None:
        batcher.start()
        try:
            pending = asyncio.ensure_future(runtime.worker.call(slow_release))
            assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
            step = asyncio.ensure_future(batcher.submit(*one_row(1)))
            await settle()
            assert not step.done() and runtime.threads == []  # not run beside the release
            release.set()
            await asyncio.wait_for(asyncio.gather(pending, step), 30)
            order.append("step")
        finally:
            await batcher.stop()
            runtime.worker.shutdown()

    asyncio.run(main())
    assert order == ["release", "step"]
    assert runtime.threads == ["decode-test"]


def test_with_more_than_one_llama_thread_every_step_goes_to_that_thread() -> None:
    """With 2 threads ggml leads an OpenMP team from the calling thread: the event loop's would be a second team."""
    runtime = ThreadedRuntime()
    runtime.options.n_threads = 2
    batcher = Batcher(runtime, StageBatching(batching_window_ms=0.0), StageMetrics("0", "test"))

    async def main() -> None:
        batcher.start()
        try:
            for seq in (1, 2, 1):
                await batcher.submit(*one_row(seq))
        finally:
            await batcher.stop()
            runtime.worker.shutdown()

    asyncio.run(main())
    assert runtime.threads == ["decode-test"] * 3


def test_inline_max_rows_is_checked() -> None:
    with_bad = config.StageBatching(inline_max_rows=-1)
    try:
        config._validate(with_bad, "batching")
    except config.ConfigError as exc:
        assert "batching.inline_max_rows: must be 0 or more" in str(exc)
    else:
        raise AssertionError("a negative inline_max_rows was accepted")
