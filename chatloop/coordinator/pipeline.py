"""Runs one planned step through the stage chain: frames out, hidden rows between hops, sampled tokens back.

Stage K receives, for every planned sequence still alive, its rows (token ids at stage 0, stage K-1's hidden
rows after that) grouped by the replica each sequence is routed to; the groups of one stage run concurrently.
A failed call drops its sequences from the rest of the step and is reported to the caller, which decides what
it means (``Scheduler``): this module owns frames and hops, not policy.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from chatloop.coordinator.cluster import Cluster, Replica
from chatloop.coordinator.sequence import Sequence
from chatloop.coordinator.stage_client import CallFailure, StageCallError
from chatloop.coordinator.step_plan import PlannedStep
from chatloop.protocol.messages import HiddenReply, SampledToken, SeqStep, TokensReply


@dataclass(frozen=True)
class HopFailure:
    stage: int
    replica: Replica
    entries: list[PlannedStep]  # the sequences the failed call carried
    error: StageCallError


@dataclass
class StepOutcome:
    completed: list[PlannedStep] = field(default_factory=list)  # went through every stage
    sampled: dict[Sequence, SampledToken] = field(default_factory=dict)  # the last stage's token per sampled entry
    # Entries with a draft: the tokens the last stage returned after the first (accepted proposals, then its own).
    more: dict[Sequence, list[SampledToken]] = field(default_factory=dict)
    failures: list[HopFailure] = field(default_factory=list)
    continued: int | None = None  # a ring step the last stage started after this one (chain_pipeline.py)
    secs: float = 0.0  # how long the step took from its start (a ring step's: from when the last stage started it)


class Pipeline:
    ring = False  # no ring steps: every step goes out from the coordinator

    def __init__(self, cluster: Cluster, n_vocab: int, wire_dtype: str = "f32") -> None:
        self.cluster = cluster
        self.n_vocab = n_vocab
        self.wire_dtype = wire_dtype  # hidden rows between stages: f32, or f16 for half the bytes

    async def close(self) -> None:
        """Nothing to close: the star's calls use the cluster's HTTP session."""

    def abandon(self, continued: int) -> None:
        """No ring steps here (``ChainPipeline.abandon``)."""

    async def run(
        self, plan: list[PlannedStep], continued: int | None = None, grant: frozenset[int] = frozenset()
    ) -> StepOutcome:
        """Run ``plan`` stage by stage (``continued`` and ``grant``: ring steps, which the star has not)."""
        start = time.perf_counter()
        outcome = StepOutcome()
        rows: dict[Sequence, np.ndarray] = {p.seq: p.token_ids() for p in plan}
        live = plan
        n_stages = len(self.cluster.stages)
        for k in range(n_stages):
            groups: dict[Replica, list[PlannedStep]] = {}
            for p in live:
                groups.setdefault(p.seq.route[k], []).append(p)
            calls = [self._hop(k, r, g, rows, outcome, last=k == n_stages - 1) for r, g in groups.items()]
            done = await asyncio.gather(*calls)
            live = [p for ok in done for p in ok if not p.seq.done]
            if not live:
                break
        else:
            outcome.completed = live
        outcome.secs = time.perf_counter() - start
        return outcome

    async def _hop(
        self,
        k: int,
        r: Replica,
        group: list[PlannedStep],
        rows: dict[Sequence, np.ndarray],
        outcome: StepOutcome,
        last: bool,
    ) -> list[PlannedStep]:
        """One replica's part of stage ``k``; returns the entries that went through."""
        steps = [seq_step(p, last) for p in group]
        data = rows[group[0].seq] if len(group) == 1 else np.concatenate([rows[p.seq] for p in group])
        traces = [p.seq.trace_id for p in group if p.seq.trace_id]
        try:
            want = "f32" if last else self.wire_dtype
            reply = await self.cluster.client.forward(r.url, r.name, k, steps, data, traces, want)
            if last:
                return self._take_tokens(r, group, reply, outcome)
            return self._take_hidden(r, group, reply, rows)
        except StageCallError as exc:
            outcome.failures.append(HopFailure(k, r, group, exc))
            return []

    @staticmethod
    def _take_hidden(
        r: Replica, group: list[PlannedStep], reply, rows: dict[Sequence, np.ndarray]
    ) -> list[PlannedStep]:
        n_rows = sum(p.rows for p in group)
        if not isinstance(reply, HiddenReply) or reply.rows.shape[0] != n_rows:
            raise StageCallError(CallFailure.PROTOCOL, f"{r.name}: expected {n_rows} hidden rows")
        offset = 0
        for p in group:
            rows[p.seq] = reply.rows[offset : offset + p.rows]
            offset += p.rows
        return group

    def _take_tokens(self, r: Replica, group: list[PlannedStep], reply, outcome: StepOutcome) -> list[PlannedStep]:
        if not isinstance(reply, TokensReply):
            raise StageCallError(CallFailure.PROTOCOL, f"{r.name}: the last stage answered without tokens")
        by_seq = tokens_by_seq(reply.tokens)
        if set(by_seq) != {p.seq.id for p in group if p.sample}:
            raise StageCallError(CallFailure.PROTOCOL, f"{r.name}: sampled tokens for other sequences than asked")
        if not all(tokens_fit(p, by_seq.get(p.seq.id, []), self.n_vocab) for p in group):
            raise StageCallError(CallFailure.PROTOCOL, f"{r.name}: sampled tokens that do not fit the step")
        for p in group:
            if p.sample:
                record_tokens(outcome, p, by_seq[p.seq.id])
        return group


def tokens_by_seq(tokens: list[SampledToken]) -> dict[int, list[SampledToken]]:
    by_seq: dict[int, list[SampledToken]] = {}
    for t in tokens:
        by_seq.setdefault(t.seq_id, []).append(t)
    return by_seq


def tokens_fit(p: PlannedStep, got: list[SampledToken], n_vocab: int) -> bool:
    """Whether ``got`` is what the last stage may return for ``p``: nothing unless it samples; else one token, plus
    one per accepted proposal of its draft, each equal to that proposal (docs/design.md, "Speculative decoding"):
    anything else would put tokens in the KV that the sequence does not have. All inside the vocabulary."""
    if not p.sample:
        return not got
    if not got or len(got) > len(p.draft) + 1 or any(not 0 <= t.token < n_vocab for t in got):
        return False
    return all(t.token == d for t, d in zip(got[:-1], p.draft))


def record_tokens(outcome: StepOutcome, p: PlannedStep, got: list[SampledToken]) -> None:
    p.seq.sampler_sent = True
    outcome.sampled[p.seq] = got[0]
    if p.draft:
        outcome.more[p.seq] = got[1:]


def seq_step(p: PlannedStep, last: bool) -> SeqStep:
    seq = p.seq
    sample = p.sample and last
    # The first step after a prefix cache hit: every stage copies the cached entry's first p.pos positions.
    prefix_from = seq.prefix.seq_id if seq.prefix is not None and p.pos > 0 else None
    if sample and not seq.sampler_sent:
        # The sampler travels once per sequence (and again after a failover); penalties see the tokens generated
        # before a replay.
        sampling, accept = seq.sampling, tuple(seq.generated)
        return SeqStep(seq.id, p.pos, p.rows, True, sampling, accept, prefix_from, seq.block_end, p.draft)
    return SeqStep(
        seq.id, p.pos, p.rows, sample=sample, prefix_from=prefix_from, block_end=seq.block_end, draft=p.draft
    )
