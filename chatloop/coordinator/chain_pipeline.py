"""Runs one planned step down the stage chain (``topology: chain``, docs/design.md "The chain data plane").

The coordinator sends each stage-0 replica its rows on a persistent stream; every stage passes its output
straight to the next stage's replica that each sequence is routed to; the last stage sends the sampled tokens
back. One step thus crosses N + 1 links instead of the star's 2 x N. The coordinator keeps a stream to every
replica on a route: stage 0's carries the step out, the last stage's brings results back, and any stage reports
on its own stream the sequences it refused or could not pass on.

The outcome is a ``pipeline.StepOutcome`` with the same ``HopFailure`` records as the star's, so the scheduler's
failure policy applies unchanged:

- a refusal (``kv_missing``, ``capacity``, ``bad_request``, ``decode_failed``, ...) names the hop that refused;
- a next hop that cannot be reached is a connection failure of that hop;
- a stream that closes fails every sequence in flight through that replica at once;
- a step that is not back within the step deadline (``StepDeadlines``, the chain's own typical step time) is a
  stalled hop: the route's replicas are probed (``/v1/info``, short timeout) and the ones that do not answer are
  the failed hops. When every replica answers (a lost frame, a link between two stages that drops everything),
  nobody is blamed and the step is retried like a busy stage's (new epoch, at most ``max_retries`` x 4 times).

Each step carries a step id and, per sequence, a route epoch that grows whenever the sequence starts over
(failover, replay, retry), so frames of an abandoned attempt (a stopped replica that resumes) are dropped by the
stages and by this coordinator.

Ring steps (``ring_steps``, docs/design.md "Ring steps"): when every sequence of a step decodes, the coordinator
grants the last stage a ring: a block of step ids to start one after another. The last stage then sends the
sampled tokens straight on to stage 0 as the next step, again and again, and each result says which step it
started (``ChainResult.next``). The coordinator, which meanwhile handles the tokens it got (text, stop strings,
finished sequences), takes each ring step over as its next step instead of sending one (``run(continued=...)``),
and revokes the sequences it no longer wants to go round (finished, or a newcomer must join the next step). While a
micro-batch decodes, nothing goes out from the coordinator per token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from chatloop import step_trace
from chatloop.config import CoordinatorConfig
from chatloop.coordinator.cluster import Cluster, Replica
from chatloop.coordinator.pipeline import (
    HopFailure,
    Pipeline,
    StepOutcome,
    record_tokens,
    seq_step,
    tokens_by_seq,
    tokens_fit,
)
from chatloop.coordinator.sequence import Sequence
from chatloop.coordinator.stage_client import CallFailure, StageCallError, describe, failure_of_code
from chatloop.coordinator.step_plan import PlannedStep
from chatloop.protocol.chain import (
    UNKNOWN_PEER,
    UNREACHABLE,
    ChainError,
    ChainResult,
    decode_reply,
    encode_chain,
    encode_grant,
    encode_revoke,
)
from chatloop.protocol.frames import FrameError
from chatloop.protocol.messages import ErrorCode
from chatloop.protocol.streams import COORD_HEADER, PEERS_PATH, ROLE_HEADER, StreamError, StreamLink

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline_scope
else:  # aiohttp's own dependency there
    from async_timeout import timeout as deadline_scope

log = logging.getLogger(__name__)

DEADLINE_KEY = "chain"  # StepDeadlines learns one typical time for a whole chain step (per kind)


def make_pipeline(cfg: CoordinatorConfig, cluster: Cluster, n_vocab: int) -> Pipeline | ChainPipeline:
    """The data plane of ``cfg.topology``."""
    if cfg.topology == "chain":
        return ChainPipeline(cluster, n_vocab, cfg.wire_dtype, cfg.ring_steps)
    return Pipeline(cluster, n_vocab, cfg.wire_dtype)


@dataclass(eq=False)
class _Ring:
    """A grant: the last stage starts steps ``first``..``last`` in turn with ``seqs`` (those not revoked since)."""

    first: int
    last: int
    seqs: set[int]
    where: dict[int, Replica]  # each granted sequence's last-stage replica (where revokes go)


@dataclass(eq=False)
class _Step:
    """One step in flight: which sequences are still out, and what came back."""

    id: int
    entries: dict[int, PlannedStep]  # by sequence id
    outcome: StepOutcome
    done: asyncio.Future
    remaining: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.perf_counter)
    ring: _Ring | None = None  # the ring the last stage goes on with after this step
    granted: int | None = None  # the id of the ring step it may start after this one
    continued: int | None = None  # the ring step it started

    def resolve(self, seq_ids) -> list[PlannedStep]:
        """Take sequences out of the remaining ones (those that still were); set ``done`` when none is left."""
        taken = [self.entries[s] for s in seq_ids if s in self.remaining]
        for p in taken:
            self.remaining.discard(p.seq.id)
        if not self.remaining and not self.done.done():
            self.done.set_result(None)
        return taken

    def fail(self, stage: int, replica: Replica, seq_ids, error: StageCallError) -> None:
        taken = self.resolve(seq_ids)
        if taken:
            self.outcome.failures.append(HopFailure(stage, replica, taken, error))


class ChainPipeline:
    def __init__(self, cluster: Cluster, n_vocab: int, wire_dtype: str = "f32", ring: bool = True) -> None:
        self.cluster = cluster
        self.ring = ring  # grant ring steps (``run``'s ``grant``)
        self.cfg = cluster.cfg
        self.n_vocab = n_vocab
        self.wire_dtype = wire_dtype
        self.id = uuid.uuid4().hex  # names this coordinator to the stages: where results and errors go
        self._rid = {r: i for reps in cluster.stages for i, r in enumerate(reps)}  # replica id within its stage
        self._links: dict[Replica, StreamLink] = {}
        self._tasks: set[asyncio.Task] = set()  # revokes on their way
        self._registered: set[Replica] = set()  # replicas that know their next-stage peers (since their stream opened)
        self._pending: dict[int, _Step] = {}
        self._next_id = 1  # step ids: one per step, a block per ring (``_new_ids``)
        self._step_time = cluster.metrics.worker_response_time.labels(stage="chain", worker="step")
        self._ring_steps = cluster.metrics.ring_steps
        self._epochs = itertools.count(1)
        self._attempts: dict[
            Sequence, tuple[int, int, int]
        ] = {}  # route epoch, first and last position the next step may continue from

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(link.close() for link in self._links.values()), return_exceptions=True)

    # -- a step --------------------------------------------------------------------------------------------

    async def run(
        self, plan: list[PlannedStep], continued: int | None = None, grant: frozenset[int] = frozenset()
    ) -> StepOutcome:
        """Run ``plan`` down the chain. ``continued``: the ring step the last stage started after this micro-batch's
        previous step (that outcome's ``continued``): the plan's entries it carries are taken from it, the others
        wait for the next step. ``grant``: sequences the last stage may take on to a ring step after this one
        (granted only when the step runs the whole plan)."""
        ring = self._pending.get(continued) if continued is not None else None
        if step_trace.ENABLED:
            step_trace.mark("step")
        if ring is not None:
            step, live = ring, self._adopt(ring, plan)
            if live:
                self._ring_steps.inc()
            if step.ring is not None:
                # NOTE: the ring goes on with the sequences still granted; the others stop here (finished, or the
                # whole micro-batch steps from here on: a newcomer or a prompt chunk waits for the next step).
                keep = grant & {p.seq.id for p in live} if len(live) == len(plan) else frozenset()
                self._revoke_later(step.ring, step.ring.seqs - keep)
        else:
            loop = asyncio.get_running_loop()
            step = _Step(self._new_ids(1), {p.seq.id: p for p in plan}, StepOutcome(), loop.create_future())
            step.remaining = set(step.entries)
            self._pending[step.id] = step
        try:
            if ring is None:
                await self._open_routes(step)
                live = [step.entries[s] for s in step.remaining]
            whole = len(live) == len(plan)
            if live:
                await self._send_and_wait(
                    step, live, send=ring is None, grant=grant if whole and ring is None else frozenset()
                )
        finally:
            del self._pending[step.id]
        step.outcome.completed = [p for p in step.outcome.completed if not p.seq.done]
        step.outcome.continued = step.continued if step.continued in self._pending else None
        return step.outcome

    def abandon(self, continued: int) -> None:
        """A ring step nobody takes over (its micro-batch ended): its replies are dropped, its ring ends."""
        step = self._pending.pop(continued, None)
        if step is not None and step.ring is not None:
            self._revoke_later(step.ring, step.ring.seqs)

    def _new_ids(self, n: int) -> int:
        """The first of ``n`` new step ids (increasing: a stage takes a sequence's steps in id order)."""
        first = self._next_id
        self._next_id += n
        return first

    def _revoke_later(self, ring: _Ring, seqs) -> None:
        """Tell the last stage to stop passing ``seqs`` on (sent from a task of its own: off the step's path)."""
        seqs = ring.seqs & set(seqs)
        if not seqs:
            return
        ring.seqs -= seqs
        by_replica: dict[Replica, list[int]] = {}
        for q in seqs:
            by_replica.setdefault(ring.where[q], []).append(q)
        for r, ids in by_replica.items():
            task = asyncio.get_running_loop().create_task(self._send_control(r, encode_revoke(self.id, ids)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_control(self, r: Replica, frame: bytes) -> None:
        link = self._links.get(r)
        try:
            if link is None:
                raise StreamError("no stream")
            await link.send(frame)
        except StreamError as exc:
            # NOTE: a last stage that cannot be told ends the ring with its stream anyway (its rings go with it).
            log.debug("chain: control frame to %s not sent: %s", r.name, exc)

    def _adopt(self, step: _Step, plan: list[PlannedStep]) -> list[PlannedStep]:
        """The entries of ``plan`` that the ring step ``step`` carries as planned; it forgets the rest (sequences
        that finished, or that start over) and whatever came back for them."""
        taken = []
        for p in plan:
            q = step.entries.get(p.seq.id)
            if q is not None and (q.pos, q.n, q.sample, q.draft) == (p.pos, p.n, p.sample, p.draft):
                taken.append(p)
        keep = {p.seq.id for p in taken}
        if step.ring is not None:
            step.ring.seqs &= set(step.entries)  # NOTE: the others ended at the last stage (end of generation)
        step.entries = {p.seq.id: p for p in taken}  # NOTE: the plan's own entries from now on
        step.remaining &= keep
        out = step.outcome
        out.completed = [step.entries[p.seq.id] for p in out.completed if p.seq.id in keep]
        out.sampled = {seq: t for seq, t in out.sampled.items() if seq.id in keep}
        out.failures = [
            dataclasses.replace(f, entries=[step.entries[p.seq.id] for p in f.entries if p.seq.id in keep])
            for f in out.failures
            if any(p.seq.id in keep for p in f.entries)
        ]
        if not step.remaining and not step.done.done():
            step.done.set_result(None)
        for p in taken:
            self._epoch(p)  # NOTE: the same attempt goes on (same epoch), one position further
        return taken

    async def _open_routes(self, step: _Step) -> None:
        """A stream to every replica of every route of the step; a replica that cannot be reached fails the
        sequences routed through it."""
        needed = {r for p in step.entries.values() for r in p.seq.route}
        if all(r in self._registered and self._links[r].open for r in needed):
            return  # NOTE: every step but a route's first: no tasks on the hot path
        problems = await asyncio.gather(*(self._ensure(r) for r in needed))
        for r, problem in zip(needed, problems):
            if problem is not None:
                seqs = [p.seq.id for p in step.entries.values() if r in p.seq.route]
                step.fail(r.stage, r, seqs, problem)

    async def _send(self, step: _Step, live: list[PlannedStep]) -> None:
        groups: dict[Replica, list[PlannedStep]] = {}
        for p in live:
            groups.setdefault(p.seq.route[0], []).append(p)
        if len(groups) == 1:  # NOTE: the usual case, on the hot path: no tasks
            await self._send_group(step, *next(iter(groups.items())))
            return
        await asyncio.gather(*(self._send_group(step, r, g) for r, g in groups.items()))

    async def _send_group(self, step: _Step, r: Replica, group: list[PlannedStep]) -> None:
        """The sequences of ``group`` (all routed through stage-0 replica ``r``) to ``r``'s stream."""
        n_stages = len(self.cluster.stages)
        data = np.concatenate([p.token_ids() for p in group]) if len(group) > 1 else group[0].token_ids()
        frame = encode_chain(
            self.id,
            step.id,
            0,
            [seq_step(p, True).to_wire() for p in group],
            [[self._rid[p.seq.route[k]] for k in range(n_stages)] for p in group],
            [self._epoch(p) for p in group],
            data,
            self.wire_dtype,
            [p.seq.trace_id for p in group if p.seq.trace_id],
        )
        try:
            if step_trace.ENABLED:
                step_trace.mark("send")
            await self._links[r].send(frame)
        except StreamError as exc:
            step.fail(0, r, [p.seq.id for p in group], StageCallError(CallFailure.CONNECT, f"{r.name}: {exc}"))

    def _epoch(self, p: PlannedStep) -> int:
        """The sequence's route epoch: a new one whenever the step does not continue where its last one ended
        (a new sequence, a replay, a retry), so that frames of the earlier attempt are stale everywhere."""
        last = self._attempts.get(p.seq)
        # A step with a draft continues anywhere from after its known rows to after all its rows (the proposals
        # accepted; the rejected ones are dropped from the KV).
        epoch = last[0] if last is not None and last[1] <= p.pos <= last[2] else next(self._epochs)
        self._attempts[p.seq] = (epoch, p.pos + p.n, p.pos + p.rows)
        if len(self._attempts) > 1024 + 4 * len(self.cluster.replicas) * 64:
            self._attempts = {s: a for s, a in self._attempts.items() if not s.done}
        return epoch

    async def _send_and_wait(self, step: _Step, live: list[PlannedStep], send: bool, grant: frozenset[int]) -> None:
        """Send the step (unless the last stage started it: a ring step), grant its ring step, wait for it."""
        kind = "decode" if all(p.n == 1 for p in live) else "prefill"
        deadline = self.cluster.client.deadlines.get(DEADLINE_KEY, kind)

        try:
            # NOTE: sending is inside the deadline too: a frozen stage 0 stops reading, and a send then waits for
            # its socket buffer to drain. A timeout scope, unlike wait_for, runs this in the step's own task; a
            # timeout cancels the wait on ``step.done`` (nothing else awaits it; resolve() checks done()).
            async with deadline_scope(deadline):
                if send:
                    step.started = time.perf_counter()
                    await self._send(step, live)
                if grant and self.ring and not step.done.done():
                    await self._grant(step, [p for p in live if p.seq.id in grant and p.sample and not p.draft])
                await step.done
        except asyncio.TimeoutError:
            await self._stalled(step, deadline)
            return
        step.outcome.secs = elapsed = time.perf_counter() - step.started
        if not step.outcome.failures:
            self.cluster.client.deadlines.observe(DEADLINE_KEY, kind, elapsed)
            self._step_time.observe(elapsed)

    async def _grant(self, step: _Step, granted: list[PlannedStep]) -> None:
        """Grant the last stage a ring after this step: the next steps of ``granted``, as many as the one with the
        fewest tokens left may take (a grant to each of their last-stage replicas). A grant that cannot be sent or
        comes too late costs nothing: this coordinator then sends the next step itself."""
        n = min((p.seq.max_tokens - p.seq.n_generated - 1 for p in granted), default=0)
        if n < 1:
            return
        first = self._new_ids(n)
        where = {p.seq.id: p.seq.route[-1] for p in granted}
        step.ring, step.granted = _Ring(first, first + n - 1, set(where), where), first
        by_replica: dict[Replica, list[int]] = {}
        for q, r in where.items():
            by_replica.setdefault(r, []).append(q)
        for r, seqs in by_replica.items():
            await self._send_control(r, encode_grant(self.id, step.id, first, first + n - 1, seqs))

    async def _stalled(self, step: _Step, deadline: float) -> None:
        """The step did not come back in time: probe the routes' replicas to find the hops that hang."""
        stalled = [step.entries[s] for s in step.remaining]
        suspects = list({r for p in stalled for r in p.seq.route})
        answers = await asyncio.gather(*(self._probe(r) for r in suspects))
        dead = {r for r, ok in zip(suspects, answers) if not ok}
        log.warning(
            "chain step %d: %d sequence(s) not back within %.2f s; %s",
            step.id,
            len(stalled),
            deadline,
            f"no answer from {sorted(r.name for r in dead)}" if dead else "every replica of their routes answers",
        )
        for p in stalled:
            hop = next((r for r in p.seq.route if r in dead), None)
            if hop is not None:
                message = f"{hop.name}: step not back within {deadline:.2f} s and no answer to a probe"
                step.fail(hop.stage, hop, [p.seq.id], StageCallError(CallFailure.TIMEOUT, message))
            else:
                # NOTE: retried as a busy stage's step is (bounded by max_retries): the retry comes with a new epoch,
                # and stages that took the lost step rewind to its position.
                r = p.seq.route[0]
                message = f"step not back within {deadline:.2f} s though every replica of its route answers"
                step.fail(0, r, [p.seq.id], StageCallError(CallFailure.BUSY, message))

    async def _probe(self, r: Replica) -> bool:
        session = self.cluster.client.session
        if session is None:
            return False
        timeout = aiohttp.ClientTimeout(total=2 * self.cfg.connect_timeout_secs)
        try:
            async with session.get(f"{r.url}/v1/info", timeout=timeout) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    # -- streams -------------------------------------------------------------------------------------------

    async def _ensure(self, r: Replica) -> StageCallError | None:
        """Open (or keep) the stream to ``r``, after telling it its next-stage peers; None when it is up."""
        link = self._links.get(r)
        if link is None:
            session = self.cluster.client.session
            assert session is not None
            link = self._links[r] = StreamLink(
                session,
                r.url,
                {ROLE_HEADER: "coordinator", COORD_HEADER: self.id},
                connect_timeout=self.cfg.connect_timeout_secs,
                on_frame=functools.partial(self._on_reply, r),
                on_close=functools.partial(self._on_closed, r),
            )
        try:
            if r not in self._registered:
                await self._register(r)
                self._registered.add(r)
            if not link.open:
                await link.connect()
        except StreamError as exc:
            return StageCallError(CallFailure.CONNECT, f"{r.name}: {exc}")
        except StageCallError as exc:
            return exc
        return None

    async def _register(self, r: Replica) -> None:
        """``POST /v1/peers``: the replicas of the next stage that ``r`` may pass steps on to (ids and URLs); for
        the last stage, with ring steps, stage 0's."""
        nxt = r.stage + 1
        if nxt >= len(self.cluster.stages):
            if not self.ring:
                return
            nxt = 0
        peers = {str(i): n.url for i, n in enumerate(self.cluster.stages[nxt])}
        session = self.cluster.client.session
        assert session is not None
        timeout = aiohttp.ClientTimeout(total=2 * self.cfg.connect_timeout_secs)
        try:
            body = {"coordinator": self.id, "peers": peers}
            async with session.post(f"{r.url}{PEERS_PATH}", json=body, timeout=timeout) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise StageCallError(CallFailure.CONNECT, f"{r.name}: registering peers: {describe(exc)}") from None
        if status != 200:
            failure = CallFailure.SERVER if status >= 500 else CallFailure.PROTOCOL
            raise StageCallError(failure, f"{r.name}: registering peers answered {status}", status)

    def _on_closed(self, r: Replica, reason: str) -> None:
        """A stream ended: every sequence in flight through ``r`` fails with it, now."""
        self._registered.discard(r)
        error = StageCallError(CallFailure.CONNECT, f"{r.name}: stream {reason}")
        for step in list(self._pending.values()):
            seqs = [s for s in step.remaining if r in step.entries[s].seq.route]
            step.fail(r.stage, r, seqs, error)

    def _on_reply(self, r: Replica, buf: bytes) -> None:
        if step_trace.ENABLED:
            step_trace.mark("reply")
        try:
            reply = decode_reply(buf)
        except FrameError as exc:
            log.warning("chain: unreadable frame from %s: %s", r.name, exc)
            error = StageCallError(CallFailure.PROTOCOL, f"{r.name}: bad chain reply: {exc}")
            for step in list(self._pending.values()):
                step.fail(r.stage, r, [s for s in step.remaining if r in step.entries[s].seq.route], error)
            return
        step = self._pending.get(reply.step)
        if step is None:
            log.debug("chain: late reply for step %d from %s dropped", reply.step, r.name)
            return
        if isinstance(reply, ChainResult):
            self._take_result(step, r, reply)
        else:
            self._take_error(step, r, reply)

    def _take_result(self, step: _Step, r: Replica, reply: ChainResult) -> None:
        by_seq = tokens_by_seq(reply.tokens)
        mine = [s for s in reply.seqs if s in step.remaining and step.entries[s].seq.route[-1] is r]
        bad = [s for s in mine if not tokens_fit(step.entries[s], by_seq.get(s, []), self.n_vocab)]
        if bad:
            error = StageCallError(CallFailure.PROTOCOL, f"{r.name}: sampled tokens do not match the step")
            step.fail(r.stage, r, bad, error)
        good = step.resolve([s for s in mine if s not in bad])
        for p in good:
            step.outcome.completed.append(p)
            if p.sample:
                record_tokens(step.outcome, p, by_seq[p.seq.id])
        if reply.next is not None and reply.next == step.granted:
            self._take_ring_step(step, reply, good)

    def _take_ring_step(self, step: _Step, reply: ChainResult, good: list[PlannedStep]) -> None:
        """The last stage started ring step ``reply.next`` for ``reply.next_seqs``: wait for its replies from now
        on (``run`` takes it over, or ``abandon`` drops it)."""
        ring = self._pending.get(reply.next)
        if ring is None:
            done = asyncio.get_running_loop().create_future()
            ring = self._pending[reply.next] = _Step(reply.next, {}, StepOutcome(), done, ring=step.ring)
            assert step.ring is not None
            ring.granted = reply.next + 1 if reply.next < step.ring.last else None
            step.continued = reply.next
        went_on = set(reply.next_seqs)
        for p in good:
            if p.seq.id in went_on and p.sample and not p.draft:
                ring.entries[p.seq.id] = PlannedStep(p.seq, p.pos + p.rows, 1, True)
                ring.remaining.add(p.seq.id)
        if ring.remaining and ring.done.done():
            # NOTE: another last-stage replica's part of the ring step came back before this one's part started
            # (nobody waits for the step yet: it is taken over once every result of this step is in).
            ring.done = asyncio.get_running_loop().create_future()

    def _take_error(self, step: _Step, r: Replica, err: ChainError) -> None:
        hop = r
        if err.replica is not None:
            reps = self.cluster.stages[err.stage] if 0 <= err.stage < len(self.cluster.stages) else []
            hop = reps[err.replica] if 0 <= err.replica < len(reps) else r
        if err.code == UNREACHABLE:
            failure = CallFailure.CONNECT
        elif err.code == UNKNOWN_PEER:
            failure = CallFailure.BUSY  # re-registered before the next step
            self._registered.discard(r)
            hop = r
        else:
            try:
                failure = failure_of_code(ErrorCode(err.code))
            except ValueError:
                failure = CallFailure.PROTOCOL
        step.fail(hop.stage, hop, err.seqs, StageCallError(failure, f"{hop.name}: {err.message}"))
