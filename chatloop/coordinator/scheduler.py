"""Continuous batching across the stage chain: the life of a step.

Admitted sequences (``admission.Admission``) are spread over ``pipeline_depth`` micro-batches (default: one
per stage). Each micro-batch loops on its own; one step:

1. gives every member a replica per stage (``Cluster.ensure_route``),
2. plans each member's rows (``step_plan.plan_step``: one decode row, or a prompt chunk),
3. runs them through the stages (``pipeline.Pipeline``); in a chain, when every member decodes, the last stage may
   start the next step itself (a ring step), which the micro-batch's next step then takes over,
4. applies the outcome: completed rows are cached, sampled tokens go out (``output.TokenOutput``), failures
   are judged here (``_on_failure``).

With several micro-batches in flight, stage K works on one while stage K-1 works on another. A new request
joins a micro-batch at its next step; a finished one leaves at once.

Failover: when a replica fails during a step, the sequences on it get a new replica for that stage, forget
what they had cached (``n_cached = 0``) and replay prompt and generated tokens on their next step; stages
that still hold their KV rewind it to position 0 themselves. The client sees one stream.
"""

from __future__ import annotations

import asyncio
import logging

from chatloop.config import CoordinatorConfig
from chatloop.coordinator.admission import Admission, AdmissionError
from chatloop.coordinator.chain_pipeline import make_pipeline
from chatloop.coordinator.cluster import Cluster, NoReplicaError, Replica
from chatloop.coordinator.draft_model import DraftModel
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.output import TokenOutput
from chatloop.coordinator.pipeline import HopFailure
from chatloop.coordinator.prefix_cache import CacheEntry, PrefixCache
from chatloop.coordinator.sequence import FinishEvent, Sequence
from chatloop.coordinator.speculation import Speculator
from chatloop.coordinator.stage_client import CallFailure
from chatloop.coordinator.step_plan import plan_step
from chatloop.engine.tokenizer import Tokenizer
from chatloop.protocol.messages import BLOCK_ROWS

log = logging.getLogger(__name__)

__all__ = ["AdmissionError", "Scheduler"]

# A cached prefix is used on its route only while each replica there runs at most this many more sequences than
# the least loaded replica of its stage; otherwise the request goes where there is room and prefills.
AFFINITY_SLACK = 2


class MicroBatch:
    def __init__(self, index: int) -> None:
        self.index = index
        self.members: list[Sequence] = []
        self.task: asyncio.Task | None = None
        self.continued: int | None = None  # the ring step the last stage started after this one's last step


class Scheduler:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        cluster: Cluster,
        tokenizer: Tokenizer,
        metrics: CoordinatorMetrics,
        draft: DraftModel | None = None,
    ) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.metrics = metrics
        self.admission = Admission(cfg, cluster)
        self.pipeline = make_pipeline(cfg, cluster, tokenizer.n_vocab)  # topology: star or chain
        self.output = TokenOutput(tokenizer, metrics)
        self.speculator = Speculator(cfg.speculative, metrics, draft)
        self.cache: PrefixCache | None = None
        if cfg.prefix_cache:
            self.cache = PrefixCache(
                metrics, cfg.prefix_cache_tokens, cluster.slots_free, self._release_entry, cfg.prefix_cache_exact
            )
            cluster.on_lost.append(self.cache.forget_replica)
            self.admission.cache = self.cache
        depth = cfg.batching.pipeline_depth or len(cluster.stages)
        self.batches = [MicroBatch(i) for i in range(depth)]
        self._janitor: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self.closed = False

    # -- views -----------------------------------------------------------------------------------------

    @property
    def waiting(self):
        return self.admission.waiting

    @property
    def active(self) -> set[Sequence]:
        return self.admission.active

    @property
    def reserved(self) -> int:
        return self.admission.reserved

    @property
    def busy(self) -> int:
        return len(self.admission.waiting) + len(self.admission.active)

    def kv_budget(self) -> int:
        return self.admission.kv_budget()

    def context_limit(self) -> int:
        return self.admission.context_limit()

    def max_active(self) -> int:
        return self.admission.max_active()

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._janitor = asyncio.get_running_loop().create_task(self._janitor_loop(), name="queue-janitor")

    async def close(self) -> None:
        self.closed = True
        for seq in list(self.admission.waiting) + list(self.admission.active):
            self._finish(seq, FinishEvent("error", status=503, message="coordinator shutting down"))
        if self.cache:
            self.cache.clear()
        tasks = [b.task for b in self.batches if b.task] + list(self._background)
        if self._janitor:
            tasks.append(self._janitor)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.pipeline.close()
        if self.speculator.draft is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.speculator.draft.close)

    # -- requests --------------------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; raises ``AdmissionError`` when the queue is full or the cluster not ready."""
        if self.closed:
            raise AdmissionError("coordinator is shutting down")
        self.admission.enqueue(seq)
        self._admit()

    def cancel(self, seq: Sequence) -> None:
        """The client went away: stop generating and free the sequence's KV everywhere."""
        if seq.done:
            return
        if seq in self.admission.waiting:
            self.admission.remove(seq)
            seq.done = True
            self._update_gauges()
            return
        self._finish(seq, FinishEvent("cancelled"))

    def _admit(self) -> None:
        for seq in self.admission.admit():
            self._take_prefix(seq)
            batch = min(self.batches, key=lambda b: len(b.members))
            batch.members.append(seq)
            if batch.task is None or batch.task.done():
                batch.task = asyncio.get_running_loop().create_task(
                    self._run_batch(batch), name=f"microbatch-{batch.index}"
                )
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.admission.waiting))
        self.metrics.active_sequences.set(len(self.admission.active))

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            timeout = self.cfg.batching.queue_timeout_secs
            for seq in self.admission.expired():
                seq.done = True
                message = f"request waited {timeout:g} s without being admitted"
                seq.events.put_nowait(FinishEvent("error", status=503, message=message))
            self.metrics.tokens_per_second.set(self.output.tokens_per_second())
            if self.admission.waiting:
                self._admit()
            else:
                self._update_gauges()

    # -- the step loop ---------------------------------------------------------------------------------

    async def _run_batch(self, batch: MicroBatch) -> None:
        try:
            while True:
                batch.members = [s for s in batch.members if not s.done]
                if not batch.members:
                    return
                try:
                    await self._step(batch)
                    worst = max((s.retries for s in batch.members if not s.done), default=0)
                    if worst:
                        await asyncio.sleep(min(1.0, 0.05 * 2 ** (worst - 1)))  # bounded backoff between retries
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a bug must fail requests, never hang them
                    log.exception("step failed")
                    for seq in batch.members:
                        self._finish(seq, FinishEvent("error", status=500, message=f"internal error: {exc}"))
        finally:
            if batch.continued is not None:
                self.pipeline.abandon(batch.continued)
                batch.continued = None

    async def _step(self, batch: MicroBatch) -> None:
        members = batch.members
        for seq in members:
            self._ensure_route(seq)
        plan = plan_step(members, self.cfg.batching.prefill_chunk_tokens)
        if not plan:
            await asyncio.sleep(0.01)
            return
        plan = await self.speculator.attach(plan, in_flight=sum(1 for b in self.batches if b.members))
        continued, batch.continued = batch.continued, None
        outcome = await self.pipeline.run(plan, continued, self._grantable(plan))
        batch.continued = outcome.continued
        if not outcome.failures:
            self.speculator.observe_step(plan, outcome.secs)
        for failure in outcome.failures:
            self._on_failure(failure)
        for p in plan:
            if p.seq.done:
                # Cancelled while this step was in flight: a stage may have re-created the sequence after its
                # release went out, so release it again everywhere.
                self._release(p.seq.id, p.seq.route)
        for p in outcome.completed:
            if p.seq.done:
                continue
            # A verified draft: the accepted proposals are in every stage's KV too; the rows after them are
            # dropped by the next step, which starts here (docs/design.md, "Speculative decoding").
            accepted = len(outcome.more.get(p.seq, ()))
            p.seq.n_cached = p.pos + p.n + accepted
            p.seq.retries = 0
            self._drop_prefix(p.seq)  # every stage holds its own copy now
            self.speculator.record(p, accepted)
        for seq, token in outcome.sampled.items():
            for out in (token, *outcome.more.get(seq, ())):
                if seq.done:
                    break
                reason = self.output.deliver(seq, out)
                if reason:
                    seq.n_cached = min(seq.n_cached, len(seq.tokens))  # it may stop inside the accepted tokens
                    self._finish(seq, FinishEvent(reason))

    def _grantable(self, plan) -> frozenset[int]:
        """The sequences whose next step the last stage may start itself (a ring step): only when every member
        decodes without proposals (a prompt chunk waiting for a ring step would lose a step each time), and not for
        a sequence this step takes to its max_tokens."""
        if not self.pipeline.ring or any(not p.sample or p.draft or self.speculator.proposes(p.seq) for p in plan):
            return frozenset()
        return frozenset(p.seq.id for p in plan if p.seq.n_generated + 1 < p.seq.max_tokens)

    def _ensure_route(self, seq: Sequence) -> None:
        if seq.done:
            return
        try:
            changed = self.cluster.ensure_route(seq.route)
        except NoReplicaError as exc:
            self._finish(seq, FinishEvent("error", status=503, message=str(exc)))
            return
        for stage, old in changed:
            if self.cache:
                self.cache.make_room(seq.route[stage])  # a cached entry there gives its slot to running work
            if old is not None:
                self._spawn(self.cluster.release(old, [seq.id]))
                self._replay(seq, stage)

    def _take_prefix(self, seq: Sequence) -> None:
        """A newly admitted sequence starts from the longest cached prefix of its prompt, on that entry's route,
        unless a replica of the route is much busier than its stage's least loaded one (load still counts)."""
        if self.cache is None:
            return

        def usable(entry: CacheEntry) -> bool:
            return all(
                r.routable() and r.sequences <= self.cluster.least_loaded(k) + AFFINITY_SLACK
                for k, r in enumerate(entry.route)
            )

        hit = self.cache.lookup(seq.prompt, usable, seq.block_end)
        if hit is None:
            return
        self.cache.pin(hit)
        seq.route = list(hit.entry.route)
        self.cluster.join(seq.route)
        seq.prefix = hit.entry
        seq.n_cached = hit.length
        seq.cached_tokens = hit.length
        if hit.length % BLOCK_ROWS:
            # Not exact (prefix_cache_exact: false): the prompt's rest runs in row mode, a block may not start here.
            seq.block_limit = hit.length
        for r in seq.route:
            self.cache.make_room(r)

    def _replay(self, seq: Sequence, stage: int) -> None:
        if seq.n_cached or seq.n_generated:
            seq.failovers += 1
            self.metrics.failovers.labels(stage=str(stage)).inc()
        self._drop_prefix(seq)
        seq.cached_tokens = 0
        seq.reset_cache()

    def _drop_prefix(self, seq: Sequence) -> None:
        if seq.prefix is not None and self.cache is not None:
            self.cache.unpin(seq.prefix)
        seq.prefix = None

    def _on_failure(self, f: HopFailure) -> None:
        err = f.error
        if err.failure.replica_fault:
            self.cluster.mark_down(f.replica, str(err))
        log.warning("stage %d call failed (%s): %s", f.stage, err.failure.value, err)
        for p in f.entries:
            seq = p.seq
            if seq.done:
                continue
            if err.failure is CallFailure.INVALID:
                self._finish(seq, FinishEvent("error", status=400, message=str(err)))
            elif err.failure is CallFailure.KV_MISSING:
                if seq.prefix is not None and self.cache is not None:
                    self.cache.forget(seq.prefix)  # the cached entry is gone at that stage (restart or reaping)
                self._replay(seq, f.stage)  # the replica lost the sequence (restart or idle reaping)
            else:
                # A busy stage (no room, draining, a raced cancel) gets more patience than a failing one.
                busy = err.failure is CallFailure.BUSY
                seq.retries += 1
                if seq.retries > self.cfg.max_retries * (4 if busy else 1):
                    what = "has no room" if busy else "failed"
                    self._finish(seq, FinishEvent("error", status=503, message=f"stage {f.stage} {what}: {err}"))

    def _finish(self, seq: Sequence, event: FinishEvent) -> None:
        if seq.done:
            return
        seq.done = True
        seq.finish_reason = event.reason
        if event.reason == "length" or (event.reason == "stop" and not seq.stream.stopped):
            event.text = seq.stream.flush()
        self._drop_prefix(seq)
        if self.speculator.draft is not None and not self.closed:
            self._spawn(self.speculator.forget(seq))
        if self.admission.remove(seq):
            route = self.cluster.leave(seq.route)
            if not (event.reason in ("stop", "length") and self._keep_in_cache(seq, route)):
                self._release(seq.id, route)
        seq.events.put_nowait(event)
        if not self.closed:
            self._admit()

    def _keep_in_cache(self, seq: Sequence, route: list[Replica]) -> bool:
        """Keep a finished sequence's KV as a prefix cache entry (its stages hold ``n_cached`` positions)."""
        if self.cache is None or self.closed or len(route) != len(self.cluster.stages):
            return False
        if not all(r.routable() for r in route):
            return False
        reusable = min(seq.block_end, seq.n_cached) if self.cache.exact else seq.n_cached
        return self.cache.add(seq.id, seq.tokens[: seq.n_cached], route, reusable)

    def _release_entry(self, replica: Replica, seq_id: int) -> None:
        self._spawn(self.cluster.release(replica, [seq_id]))

    def _release(self, seq_id: int, replicas) -> None:
        for r in replicas:
            if r is not None:
                self._spawn(self.cluster.release(r, [seq_id]))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
