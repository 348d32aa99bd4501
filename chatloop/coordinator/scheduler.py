"""Continuous batching across the stage chain.

Admitted sequences are spread over ``pipeline_depth`` micro-batches (default: one per stage). Each
micro-batch loops on its own: one step sends every member's next input (a prompt chunk or its last
token) through all stages and samples one token per member. With several micro-batches in flight,
stage K works on one while stage K-1 works on another. A new request joins a micro-batch at its next
step; a finished one leaves at once.

Prompts enter in chunks (``prefill_chunk_tokens`` per step and micro-batch), so a long new prompt delays
the running sequences by at most one chunk. Admission is first come, first served, bounded by the
number of sequences (every stage holds one KV stream per sequence) and, when ``kv_cache_tokens`` is set, by
a shared budget (each request reserves prompt + max_tokens positions).

Failover: when a replica fails during a step, the sequences on it get a new replica for that stage,
forget what they had cached (``n_cached = 0``) and replay prompt and generated tokens on their next
step; stages that still hold their KV rewind it to position 0 themselves. The client sees one stream.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from chatloop.config import CoordinatorConfig
from chatloop.coordinator.cluster import REPLICA_FAULTS, Cluster, Replica, StageCallError
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.text import TextStream
from chatloop.engine.sampling import SamplingParams
from chatloop.engine.tokenizer import Tokenizer
from chatloop.wire import step_to_wire

log = logging.getLogger(__name__)


class AdmissionError(Exception):
    def __init__(self, message: str, status: int = 503, retry_after: int | None = 1) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class TokenEvent:
    token: int
    text: str  # text safe to emit now (may be empty while a character or a stop string is incomplete)
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class FinishEvent:
    reason: str  # stop | length | error
    text: str = ""  # held-back text released at the end
    status: int = 200
    message: str = ""


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    trace_id: str | None = None  # W3C trace id carried to the stages
    id: int = field(default_factory=lambda: random.getrandbits(62) + 1)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    n_cached: int = 0  # positions every stage of the route holds
    route: list[Replica | None] = field(default_factory=list)
    sampler_sent: bool = False  # the last stage has this sequence's sampler
    failovers: int = 0
    retries: int = 0
    done: bool = False
    finish_reason: str | None = None
    created: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    deadline: float = 0.0
    stream: TextStream | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def reserved(self) -> int:
        return len(self.prompt) + self.max_tokens


@dataclass(eq=False)
class MicroBatch:
    index: int
    members: list[Sequence] = field(default_factory=list)
    task: asyncio.Task | None = None


class Scheduler:
    def __init__(
        self, cfg: CoordinatorConfig, cluster: Cluster, tokenizer: Tokenizer, metrics: CoordinatorMetrics
    ) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.tokenizer = tokenizer
        self.metrics = metrics
        n_stages = len(cluster.stages)
        depth = cfg.batching.pipeline_depth or n_stages
        self.batches = [MicroBatch(i) for i in range(depth)]
        self.waiting: deque[Sequence] = deque()
        self.active: set[Sequence] = set()
        self.reserved = 0
        self._janitor: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._rate_window: deque[tuple[float, int]] = deque()
        self.closed = False

    # -- capacity --------------------------------------------------------------------------------------

    def kv_budget(self) -> int:
        """Positions all admitted requests may reserve together; 0 = no shared budget (each sequence has its
        own KV stream of ``n_ctx_seq`` positions at every stage, so slots and context_limit() bound admission)."""
        return self.cfg.kv_cache_tokens

    def max_active(self) -> int:
        slots = self.cluster.min_info("max_sequences")
        return min(self.cfg.batching.max_batch_size, slots) if slots else self.cfg.batching.max_batch_size

    def context_limit(self) -> int:
        """Longest prompt + max_tokens one request may reserve."""
        limits = [
            x for x in (self.kv_budget(), self.cluster.min_info("n_ctx_seq"), self.cluster.min_info("n_ctx_train")) if x
        ]
        return min(limits) if limits else 0

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._janitor = asyncio.get_running_loop().create_task(self._janitor_loop(), name="queue-janitor")

    async def close(self) -> None:
        self.closed = True
        for seq in list(self.waiting) + list(self.active):
            self._finish(seq, FinishEvent("error", status=503, message="coordinator shutting down"))
        tasks = [b.task for b in self.batches if b.task] + list(self._background)
        if self._janitor:
            tasks.append(self._janitor)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def busy(self) -> int:
        return len(self.waiting) + len(self.active)

    # -- requests --------------------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; raises ``AdmissionError`` when the queue is full or the cluster not ready."""
        if self.closed:
            raise AdmissionError("coordinator is shutting down")
        if not self.cluster.ready():
            raise AdmissionError("not ready: a stage has no healthy replica")
        if len(self.waiting) >= self.cfg.batching.max_queue_size:
            raise AdmissionError(f"server busy: {len(self.waiting)} requests already waiting")
        seq.stream = TextStream(seq.stop)
        seq.deadline = time.monotonic() + self.cfg.batching.queue_timeout_secs
        self.waiting.append(seq)
        self.metrics.queue_depth.set(len(self.waiting))
        self._admit()

    def cancel(self, seq: Sequence) -> None:
        """The client went away: stop generating and free the sequence's KV everywhere."""
        if seq.done:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
            seq.done = True
            self.metrics.queue_depth.set(len(self.waiting))
            return
        self._finish(seq, FinishEvent("cancelled"))

    def _admit(self) -> None:
        budget = self.kv_budget()
        limit = self.max_active()
        while self.waiting and len(self.active) < limit:
            seq = self.waiting[0]
            if seq.done:
                self.waiting.popleft()
                continue
            if budget and self.reserved + seq.reserved > budget and self.active:
                break  # NOTE: first come, first served: later requests never overtake the head.
            self.waiting.popleft()
            seq.admitted_at = time.monotonic()
            seq.route = [None] * len(self.cluster.stages)
            self.active.add(seq)
            self.reserved += seq.reserved
            batch = min(self.batches, key=lambda b: len(b.members))
            batch.members.append(seq)
            if batch.task is None or batch.task.done():
                batch.task = asyncio.get_running_loop().create_task(
                    self._run_batch(batch), name=f"microbatch-{batch.index}"
                )
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.active_sequences.set(len(self.active))

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for seq in [s for s in self.waiting if s.deadline < now]:
                self.waiting.remove(seq)
                seq.done = True
                seq.events.put_nowait(
                    FinishEvent(
                        "error",
                        status=503,
                        message=(f"request waited {self.cfg.batching.queue_timeout_secs:g} s without being admitted"),
                    )
                )
            self.metrics.queue_depth.set(len(self.waiting))
            while self._rate_window and self._rate_window[0][0] < now - 10:
                self._rate_window.popleft()
            self.metrics.tokens_per_second.set(sum(n for _, n in self._rate_window) / 10.0)
            if self.waiting:
                self._admit()

    # -- the step loop ---------------------------------------------------------------------------------

    async def _run_batch(self, batch: MicroBatch) -> None:
        while True:
            batch.members = [s for s in batch.members if not s.done]
            if not batch.members:
                return
            try:
                await self._step(batch.members)
                worst = max((s.retries for s in batch.members if not s.done), default=0)
                if worst:
                    await asyncio.sleep(min(1.0, 0.05 * 2 ** (worst - 1)))  # bounded backoff between retries
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must fail requests, never hang them
                log.exception("step failed")
                for seq in batch.members:
                    self._finish(seq, FinishEvent("error", status=500, message=f"internal error: {exc}"))

    def _plan(self, members: list[Sequence]) -> list[tuple[Sequence, int, int, bool]]:
        """(sequence, start position, rows, sample) for this step: decodes first, then prompt chunks."""
        plan = []
        budget = self.cfg.batching.prefill_chunk_tokens
        by_need = sorted(members, key=lambda s: len(s.tokens) - s.n_cached)
        for seq in by_need:
            remaining = len(seq.tokens) - seq.n_cached
            if remaining <= 0:
                continue
            if remaining == 1:
                n = 1
            else:
                n = min(remaining, budget)
                if n <= 0:
                    continue
                budget -= n
            plan.append((seq, seq.n_cached, n, seq.n_cached + n == len(seq.tokens)))
        return plan

    async def _step(self, members: list[Sequence]) -> None:
        for seq in members:
            if not self._ensure_route(seq):
                return
        plan = [p for p in self._plan(members) if not p[0].done]
        if not plan:
            await asyncio.sleep(0.01)
            return
        rows: dict[Sequence, np.ndarray] = {}
        for seq, pos, n, _ in plan:
            rows[seq] = np.asarray(seq.tokens[pos : pos + n], dtype=np.int32)
        live = plan
        sampled: dict[Sequence, dict] = {}
        n_stages = len(self.cluster.stages)
        for k in range(n_stages):
            groups: dict[Replica, list[tuple[Sequence, int, int, bool]]] = {}
            for p in live:
                groups.setdefault(p[0].route[k], []).append(p)
            results = await asyncio.gather(*(self._call(k, r, g, rows) for r, g in groups.items()))
            live = [p for ok in results for p in ok if not p[0].done]
            if not live:
                break
        for seq, *_ in plan:
            if seq.done:
                # Cancelled while this step was in flight: a stage may have re-created the sequence after its
                # release went out, so release it again everywhere.
                self._release_everywhere(seq)
        for seq, pos, n, sample in live:
            if seq.done:
                continue
            seq.n_cached = pos + n
            seq.retries = 0
            if sample:
                out = rows.get(seq)
                if isinstance(out, dict):
                    sampled[seq] = out
        for seq, tok in sampled.items():
            self._on_token(seq, tok)

    def _ensure_route(self, seq: Sequence) -> bool:
        if seq.done:
            return True
        for k, r in enumerate(seq.route):
            if r is not None and r.healthy and r.mismatch is None:
                continue
            new = self.cluster.pick(k)
            if new is None:
                self._finish(seq, FinishEvent("error", status=503, message=f"no healthy replica for stage {k}"))
                return True
            if r is not None:
                r.sequences -= 1
                self._spawn(self.cluster.release(r, [seq.id]))
                self._reset(seq, k)
            new.sequences += 1
            seq.route[k] = new
            self.metrics.routed.labels(stage=str(k), worker=new.name).inc()
        return True

    def _reset(self, seq: Sequence, stage: int) -> None:
        if seq.n_cached or seq.generated:
            seq.failovers += 1
            self.metrics.failovers.labels(stage=str(stage)).inc()
        seq.n_cached = 0
        seq.sampler_sent = False

    async def _call(self, k: int, r: Replica, group: list, rows: dict) -> list:
        """Send one replica its part of the step; returns the entries that succeeded."""
        last = k == len(self.cluster.stages) - 1
        steps = []
        for seq, pos, n, sample in group:
            sampling = None
            accept = None
            if last and sample and not seq.sampler_sent:
                sampling = seq.sampling.to_wire()
                accept = seq.generated[:]  # penalties see the tokens generated before a replay
            steps.append(step_to_wire(seq.id, pos, n, sample=sample and last, sampling=sampling, accept=accept))
        data = np.concatenate([rows[p[0]] for p in group])
        traces = [p[0].trace_id for p in group if p[0].trace_id]
        try:
            header, tensor = await self.cluster.forward(r, {"kind": "forward", "steps": steps}, data, traces)
        except StageCallError as exc:
            self._on_failure(k, r, group, exc)
            return []
        if last:
            by_seq = {t.get("seq"): t for t in header.get("tokens", [])}
            for seq, _, _, sample in group:
                if sample:
                    seq.sampler_sent = True
                    rows[seq] = by_seq.get(seq.id)
            return [p for p in group if not p[3] or isinstance(rows.get(p[0]), dict)]
        if tensor is None or tensor.shape[0] != len(data):
            self._on_failure(k, r, group, StageCallError("protocol", f"{r.name}: wrong number of hidden rows"))
            return []
        offset = 0
        for seq, _, n, _ in group:
            rows[seq] = tensor[offset : offset + n]
            offset += n
        return group

    def _on_failure(self, k: int, r: Replica, group: list, exc: StageCallError) -> None:
        if exc.kind in REPLICA_FAULTS:
            self.cluster.mark_down(r, str(exc))
        log.warning("stage %d call failed (%s): %s", k, exc.kind, exc)
        for seq, *_ in group:
            if seq.done:
                continue
            if exc.kind == "bad_request":
                self._finish(seq, FinishEvent("error", status=400, message=str(exc)))
            elif exc.kind == "kv_missing":
                self._reset(seq, k)  # the replica lost the sequence (restart or idle reaping): replay
            else:
                # A busy stage (no room, draining, a raced cancel) gets more patience than a failing one.
                busy = exc.kind in ("capacity", "draining", "cancelled")
                seq.retries += 1
                if seq.retries > self.cfg.max_retries * (4 if busy else 1):
                    what = "has no room" if busy else "failed"
                    self._finish(seq, FinishEvent("error", status=503, message=f"stage {k} {what}: {exc}"))

    def _on_token(self, seq: Sequence, out: dict) -> None:
        if seq.done:
            return
        token = int(out["token"])
        now = time.monotonic()
        self.metrics.live.on_token(seq, now)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.created)
        elif seq.last_token_at is not None:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self._rate_window.append((now, 1))
        self.metrics.tokens_generated.inc()
        if self.tokenizer.is_eog(token):
            seq.generated.append(token)
            self._finish(seq, FinishEvent("stop"), count_token=True)
            return
        seq.generated.append(token)
        assert seq.stream is not None
        text = seq.stream.feed(self.tokenizer.piece(token))
        top = [(int(t), float(lp)) for t, lp in out["top"]] if out.get("top") else None
        seq.events.put_nowait(TokenEvent(token, text, out.get("logprob"), top))
        if seq.stream.stopped:
            self._finish(seq, FinishEvent("stop"))
        elif len(seq.generated) >= seq.max_tokens:
            self._finish(seq, FinishEvent("length"))

    def _finish(self, seq: Sequence, event: FinishEvent, count_token: bool = False) -> None:
        if seq.done:
            return
        seq.done = True
        seq.finish_reason = event.reason
        if (
            event.reason in ("length",)
            and seq.stream is not None
            or event.reason == "stop"
            and seq.stream is not None
            and not seq.stream.stopped
        ):
            event.text = seq.stream.flush()
        if seq in self.active:
            self.active.discard(seq)
            self.reserved -= seq.reserved
            for r in seq.route:
                if r is not None:
                    r.sequences -= 1
                    self._spawn(self.cluster.release(r, [seq.id]))
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.events.put_nowait(event)
        self.metrics.active_sequences.set(len(self.active))
        if not self.closed:
            self._admit()

    def _release_everywhere(self, seq: Sequence) -> None:
        for r in seq.route:
            if r is not None:
                self._spawn(self.cluster.release(r, [seq.id]))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
