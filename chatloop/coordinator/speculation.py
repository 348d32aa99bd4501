"""Speculative decoding policy: which decode steps carry proposals, how many, and what their outcome teaches.

A decode step normally sends one row per sequence (its last token) and gets one token back. With speculation it
also sends up to k proposed tokens (``proposals.PromptLookup``); the last stage samples after each row and stops
at the first token that differs from the next proposal, so one pass through the chain yields the accepted
proposals plus the stage's own token. What the stages computed past the accepted ones is dropped by the next step,
which starts at the first position they do not share (docs/design.md, "Speculative decoding").

The policy here:

- Lookahead per sequence: it doubles after a step whose proposals were all accepted and falls to one more than
  the accepted count otherwise, between 1 and the configured (or requested) ``max_tokens``.
- A sequence whose acceptance rate (moving average over its verifying steps) falls below ``min_acceptance`` stops
  proposing for a while (16 decode steps, doubling on each repeat up to 512), then tries again with one token.
- Rows cost compute: all sequences together may carry ``max_batch_rows`` rows per round of steps (one each plus
  proposals). With many concurrent sequences there is little or nothing to spare and speculation stays off;
  the spare rows of a step go first to the sequences whose proposals are accepted most often.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from chatloop.config import SpeculativeConfig
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.proposals import PromptLookup
from chatloop.coordinator.sequence import Sequence
from chatloop.coordinator.step_plan import PlannedStep

RATE_WEIGHT = 0.25  # weight of the latest verifying step in a sequence's acceptance rate (moving average)
MIN_STEPS_BEFORE_PAUSE = 4  # verifying steps a sequence gets before a low acceptance rate pauses it
PAUSE_STEPS = 16  # decode steps without proposals after the first pause; doubles on each repeat
MAX_PAUSE_STEPS = 512


@dataclass
class SeqSpeculation:
    """One sequence's speculation state (``Sequence.speculation``)."""

    settings: SpeculativeConfig
    lookup: PromptLookup
    k: int = 1  # current lookahead
    rate: float = 0.5  # moving average of accepted / proposed per verifying step
    steps: int = 0  # verifying steps since the last pause
    pause: int = 0  # decode steps left without proposals
    strikes: int = 0  # pauses so far (each one longer)
    proposed: int = 0
    accepted: int = 0


@dataclass
class SourceTotals:
    proposed: int = 0
    accepted: int = 0
    steps: int = 0  # verifying steps

    def view(self) -> dict:
        return {
            "proposed_tokens": self.proposed,
            "accepted_tokens": self.accepted,
            "verify_steps": self.steps,
            "acceptance_rate": round(self.accepted / self.proposed, 4) if self.proposed else None,
            "mean_accepted_length": round(self.accepted / self.steps, 3) if self.steps else None,
        }


class Speculator:
    def __init__(self, cfg: SpeculativeConfig, metrics: CoordinatorMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.totals: dict[str, SourceTotals] = {}

    def settings(self, seq: Sequence) -> SpeculativeConfig:
        return seq.speculative or self.cfg

    def _state(self, seq: Sequence) -> SeqSpeculation | None:
        st = seq.speculation
        if st is None:
            settings = self.settings(seq)
            if settings.method == "off":
                return None
            st = seq.speculation = SeqSpeculation(settings, PromptLookup(settings.ngram_min, settings.ngram_max))
            st.k = min(settings.max_tokens, 4)
        return st

    def attach(self, plan: list[PlannedStep], n_active: int) -> list[PlannedStep]:
        """The plan with proposals on the decode steps that should carry them (``n_active``: sequences running in
        all micro-batches, which share the stages' rows)."""
        decoding = [p for p in plan if p.sample and p.n == 1 and p.pos + 1 == len(p.seq.tokens) and not p.seq.done]
        if not decoding or n_active <= 0:
            return plan
        # This micro-batch's share of the rows the round may spare for proposals.
        spare = (self.cfg.max_batch_rows - n_active) * len(decoding) // n_active
        wanted: list[tuple[float, PlannedStep, SeqSpeculation]] = []
        for p in decoding:
            st = self._state(p.seq)
            if st is None:
                continue
            if st.pause > 0:
                st.pause -= 1
                continue
            wanted.append((st.rate, p, st))
        if spare <= 0 or not wanted:
            return plan
        drafts: dict[int, tuple[int, ...]] = {}
        for _, p, st in sorted(wanted, key=lambda w: -w[0]):
            # NOTE: no proposal past max_tokens: every position stays inside the sequence's KV reservation.
            room = p.seq.max_tokens - p.seq.n_generated - 1
            k = min(st.k, spare, room)
            if k <= 0:
                continue
            draft = st.lookup.propose(p.seq.tokens, k)
            if draft:
                drafts[id(p)] = tuple(draft)
                spare -= len(draft)
        if not drafts:
            return plan
        return [dataclasses.replace(p, draft=drafts[id(p)]) if id(p) in drafts else p for p in plan]

    def record(self, p: PlannedStep, accepted: int) -> None:
        """The outcome of a verifying step: ``accepted`` of ``p.draft`` were kept."""
        st = p.seq.speculation
        if st is None or not p.draft:
            return
        k = len(p.draft)
        source = st.lookup.source
        st.proposed += k
        st.accepted += accepted
        totals = self.totals.setdefault(source, SourceTotals())
        totals.proposed += k
        totals.accepted += accepted
        totals.steps += 1
        self.metrics.spec_proposed.labels(source=source).inc(k)
        self.metrics.spec_accepted.labels(source=source).inc(accepted)
        self.metrics.spec_accepted_length.labels(source=source).observe(accepted)
        limit = st.settings.max_tokens
        st.k = min(limit, 2 * st.k) if accepted == k else max(1, min(limit, accepted + 1))
        st.rate += RATE_WEIGHT * (accepted / k - st.rate)
        st.steps += 1
        if st.rate >= 0.5:
            st.strikes = 0
        if st.steps >= MIN_STEPS_BEFORE_PAUSE and st.rate < st.settings.min_acceptance:
            st.pause = min(MAX_PAUSE_STEPS, PAUSE_STEPS << st.strikes)
            st.strikes += 1
            st.steps, st.k, st.rate = 0, 1, 0.5

    def view(self) -> dict:
        """For ``/v1/cluster``: the configuration and the acceptance so far, per proposal source."""
        all_ = SourceTotals(
            proposed=sum(t.proposed for t in self.totals.values()),
            accepted=sum(t.accepted for t in self.totals.values()),
            steps=sum(t.steps for t in self.totals.values()),
        )
        return {
            "method": self.cfg.method,
            "max_tokens": self.cfg.max_tokens,
            **all_.view(),
            "sources": {name: t.view() for name, t in self.totals.items()},
        }
