"""Speculative decoding policy: which decode steps carry proposals, how many, and what their outcome teaches.

A decode step normally sends one row per sequence (its last token) and gets one token back. With speculation it
also sends proposed tokens (``proposals.PromptLookup``, or ``draft_model.DraftModel``); the last stage samples after each row and stops at the
first token that differs from the next proposal, so one pass through the chain yields the accepted proposals plus
the stage's own token. What the stages computed past the accepted ones is dropped by the next step, which starts
at the first position they do not share (docs/design.md, "Speculative decoding").

How many rows a step gets is a cost/benefit decision, made per step for the whole micro-batch:

- Benefit: a sequence's ``j``-th proposal yields a token only if it and all before it are accepted: with a per-token
  acceptance probability ``a`` (estimated per sequence from its verified steps, exponentially forgetting, starting at
  1/2), that is ``a ** j`` expected tokens.
- Cost: a step takes about ``fixed + per_base x sequences + per_row x proposed rows + per_pass x extra passes``
  seconds (``StepCost``, fitted online over the decode steps): ``fixed`` is links, hops and per-call overhead,
  ``per_row`` the compute of one more row (small on a memory-bound CPU, large on a compute-bound one), ``per_pass``
  one more pass over the weights: llama.cpp computes sequences with different numbers of rows in several ubatches
  (``engine/slots.py``), so drafts of uneven lengths cost passes that drafts of one length do not.
- Rows are added where the expected gain per cost is largest (one more row for one sequence, or one more for every
  sequence with as many rows as it, which keeps the rows even), as long as each addition raises the expected tokens
  per second of the whole pipeline by a margin (gain / cost > GAIN_MARGIN x in_flight x tokens / time): with
  ``in_flight`` micro-batches taking turns on the stages, a row added to one step delays the steps of every other
  micro-batch too. So slow links
  buy long drafts, a well-copying sequence gets more rows than a poorly-copying one, a sequence whose proposals keep
  failing gets none, and with many concurrent sequences (long, compute-bound steps, several micro-batches) only
  near-certain proposals are worth a row, if any.
- A sequence that gets no rows forgets its failures a little every decode step, so it is tried again now and then
  (text that starts to repeat its input becomes worth proposing for).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from chatloop.config import SpeculativeConfig
from chatloop.coordinator.draft_model import DraftModel
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.proposals import PromptLookup
from chatloop.coordinator.sequence import Sequence
from chatloop.coordinator.step_plan import PlannedStep
from chatloop.engine.slots import count_passes

VERIFY_DECAY = 0.8  # weight left to a sequence's earlier verified steps after each new one
IDLE_DECAY = 0.99  # weight left to its failures after each decode step without proposals (so it is retried)
COST_WEIGHT = 0.05  # weight of the latest decode step in the step-time fit (about the last 20 steps count)
PRIOR_ROW_SHARE = 0.3  # until proposals vary: a proposed row costs 0.3 x a step's time per sequence
PRIOR_WEIGHT = 1.0  # the prior counts as much as this many steps
MIN_ROW_SHARE = 0.02  # a proposed row costs at least this share of a step's time per sequence (noise can give ~0)
# A row is added only if its expected tokens per second beat the step's by this factor. NOTE: near break-even the
# rule's estimates (a fitted row cost, per-sequence acceptance rates that lag a change of text) decide, and their
# errors only lose: many sequences on a compute-bound stage, where a row costs about what its token is worth, lost
# 7 % (bench_spec, concurrency 8, no link delay: 0.93 x). Far from it (slow links) the margin costs a row or two of
# a long draft: about 1 % by the same arithmetic.
GAIN_MARGIN = 1.2


@dataclass
class SeqSpeculation:
    """One sequence's speculation state (``Sequence.speculation``)."""

    settings: SpeculativeConfig
    source: str  # ngram | draft
    lookup: PromptLookup | None  # ngram: the index of this sequence's text
    accepted_w: float = 0.0  # accepted proposals, exponentially weighted
    rejected_w: float = 0.0  # rejections (a verified step that stopped before its last proposal), weighted
    proposed: int = 0
    accepted: int = 0

    @property
    def rate(self) -> float:
        """Estimated probability that a proposal is accepted, given that those before it were (Laplace prior)."""
        return (self.accepted_w + 1.0) / (self.accepted_w + self.rejected_w + 2.0)


class StepCost:
    """Seconds a decode step takes as ``fixed + per_base x base rows + per_row x proposed rows + per_pass x extra
    passes``, fitted by exponentially weighted least squares over recent decode steps.

    NOTE: proposed rows get their own coefficient. A step's time also depends on what else the stages are doing
    (other micro-batches, prompt chunks), which grows with the number of sequences: fitted on rows alone, that load
    would be charged to the rows. With the base rows (one per sequence) as a regressor of their own, the cost of a
    proposed row is learned from steps that differ in proposals only. Until proposals vary, a prior holds it
    (``PRIOR_ROW_SHARE`` of a one-row step), as a ridge term worth ``PRIOR_WEIGHT`` steps; the cost of an extra pass
    (uneven drafts) is held at 0 the same way until steps with and without extra passes say otherwise.
    """

    def __init__(self) -> None:
        self.n = 0
        # NOTE: plain floats, not numpy: observe() runs after every step, where 4 x 4 numpy temporaries cost more
        # than the arithmetic; the solve (only when speculating) converts.
        self._m = [[0.0] * 4 for _ in range(4)]  # weighted mean of u u^T, u = (1, base rows, proposed rows, passes)
        self._v = [0.0] * 4  # weighted mean of u x seconds
        self._fit: np.ndarray | None = None

    def observe(self, base_rows: int, proposed_rows: int, secs: float, extra_passes: int = 0) -> None:
        w = 1.0 if self.n == 0 else COST_WEIGHT
        self.n += 1
        u = (1.0, float(base_rows), float(proposed_rows), float(extra_passes))
        for i, row in enumerate(self._m):
            for j in range(4):
                row[j] += w * (u[i] * u[j] - row[j])
            self._v[i] += w * (u[i] * secs - self._v[i])
        self._fit = None

    def _coefficients(self) -> np.ndarray:
        if self._fit is None:
            m, v = np.array(self._m), np.array(self._v)
            mean_step, mean_base = v[0], max(m[0, 1], 1.0)
            prior = PRIOR_ROW_SHARE * mean_step / mean_base
            # NOTE: a sequence more costs like a row until steps of different sizes say otherwise.
            ridge = np.diag([0.0, *[PRIOR_WEIGHT * COST_WEIGHT] * 3])
            # NOTE: an extra pass is free until steps with and without one say otherwise (it costs 0.5 to 2.7 rows
            # by quantization: scripts/README.md, bench_rows.py), so the policy starts as if rows were all there is.
            rhs = v + ridge @ np.array([0.0, prior, prior, 0.0])
            try:
                fit = np.linalg.solve(m + ridge, rhs)
            except np.linalg.LinAlgError:
                fit = np.array([mean_step, 0.0, prior, 0.0])
            fit[2] = min(max(fit[2], MIN_ROW_SHARE * mean_step / mean_base), mean_step)
            fit[3] = min(max(fit[3], 0.0), mean_step)
            self._fit = fit
        return self._fit

    def per_row(self) -> float:
        """Seconds one more proposed row adds to a step (0 before any step was seen)."""
        return float(self._coefficients()[2]) if self.n else 0.0

    def per_pass(self) -> float:
        """Seconds one more pass over the weights adds to a step (0 before any step was seen)."""
        return float(self._coefficients()[3]) if self.n else 0.0

    def time(self, base_rows: int, proposed_rows: int, extra_passes: int = 0) -> float:
        """Expected seconds of a step."""
        fixed, per_base, per_row, per_pass = self._coefficients()
        return max(float(fixed + per_base * base_rows + per_row * proposed_rows + per_pass * extra_passes), 1e-6)


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


def _route_verifies(seq: Sequence) -> bool:
    """Every replica of the sequence's route takes steps with a draft (stage/app.py ``STEP_FEATURES``, in its
    ``/v1/info``): a stage of an older version would refuse the frame and be marked down."""
    return all(r is not None and "draft" in r.info.get("features", ()) for r in seq.route)


@dataclass(eq=False)
class _Offer:
    step: PlannedStep
    state: SeqSpeculation
    index: int  # the sequence's place among the step's decoding sequences (their slot order, as far as known)
    available: int  # proposals the source can give (ngram: those it found; draft: as many as asked)
    tokens: list[int] | None  # ngram: the proposals; draft: made once their number is decided
    taken: int = 0


def _expected_accepted(offers: list[_Offer], takes: list[int]) -> float:
    """Expected accepted proposals when offer ``i`` proposes ``takes[i]``: the j-th pays with probability rate ** j."""
    return sum(sum(o.state.rate**j for j in range(1, k + 1)) for o, k in zip(offers, takes))


def _extra_passes(plan: list[PlannedStep]) -> int:
    """Passes over the weights a decode step takes beyond one, from the rows of its sequences in plan order.

    NOTE: a stage gives the sequences of a micro-batch consecutive slots in the order they arrive
    (engine/slots.py), which is their order in the plan; where that is not so, the fit absorbs the difference."""
    return count_passes([p.rows for p in plan]) - 1


class Speculator:
    def __init__(self, cfg: SpeculativeConfig, metrics: CoordinatorMetrics, draft: DraftModel | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.draft = draft  # method draft: the draft model (coordinator/draft_model.py)
        self.cost = StepCost()
        self.draft_secs = 0.0  # seconds the draft model takes per proposed token (moving average)
        self.totals: dict[str, SourceTotals] = {}

    def _state(self, seq: Sequence) -> SeqSpeculation | None:
        st = seq.speculation
        if st is None:
            settings = seq.speculative or self.cfg
            if settings.method == "off" or (settings.method == "draft" and self.draft is None):
                return None
            lookup = PromptLookup(settings.ngram_min, settings.ngram_max) if settings.method == "ngram" else None
            st = seq.speculation = SeqSpeculation(settings, settings.method, lookup)
        return st

    def proposes(self, seq: Sequence) -> bool:
        """Whether ``seq`` may get proposals (its request or the config turned speculation on)."""
        return self._state(seq) is not None

    async def attach(self, plan: list[PlannedStep], in_flight: int = 1) -> list[PlannedStep]:
        """The plan with proposals on the decode steps where they are expected to pay for their rows; ``in_flight``:
        the micro-batches taking turns on the stages (this one included)."""
        decoding = [p for p in plan if p.sample and p.n == 1 and p.pos + 1 == len(p.seq.tokens) and not p.seq.done]
        if not decoding or self.cost.n == 0:
            return plan  # NOTE: the first decode step measures what a step costs without proposals
        offers: list[_Offer] = []
        for i, p in enumerate(decoding):
            st = self._state(p.seq)
            if st is None or not _route_verifies(p.seq):
                continue
            # NOTE: no proposal past max_tokens: every position stays inside the sequence's KV reservation.
            room = min(st.settings.max_tokens, p.seq.max_tokens - p.seq.n_generated - 1)
            if room > 0 and st.lookup is None:
                offers.append(_Offer(p, st, i, room, None))
                continue
            found = st.lookup.propose(p.seq.tokens, room) if room > 0 and st.lookup is not None else []
            if found:
                offers.append(_Offer(p, st, i, len(found), found))
            else:
                st.rejected_w *= IDLE_DECAY
        if not offers:
            return plan
        self._allocate(offers, sum(p.rows for p in plan), len(decoding), max(1, in_flight))
        drafts: dict[int, tuple[int, ...]] = {}
        for o in offers:
            if not o.taken:
                o.state.rejected_w *= IDLE_DECAY
                continue
            if o.tokens is None:
                o.tokens = await self._draft(o.step.seq, o.taken)
            if o.tokens[: o.taken]:
                drafts[id(o.step)] = tuple(o.tokens[: o.taken])
        if not drafts:
            return plan
        return [dataclasses.replace(p, draft=drafts[id(p)]) if id(p) in drafts else p for p in plan]

    def _allocate(self, offers: list[_Offer], base: int, n_decoding: int, in_flight: int = 1) -> None:
        """Give proposals where the expected gain per cost is largest, while each addition raises the step's
        expected tokens per second (see the module notes).

        NOTE: adding rows one at a time cannot see that the first row of a new length costs a pass and the next
        ones do not. So two allocations are made, one pricing rows alone (one row at a time), one pricing passes
        too (whole levels allowed, which keep rows even), and the one worth more in expectation is taken."""
        plain = self._greedy(offers, base, n_decoding, in_flight, price_passes=False)
        if self.cost.per_pass() > 0:
            even = self._greedy(offers, base, n_decoding, in_flight, price_passes=True)
            if self._value(offers, even, base, n_decoding, in_flight) > self._value(
                offers, plain, base, n_decoding, in_flight
            ):
                plain = even
        for o, k in zip(offers, plain):
            o.taken = k

    def _greedy(
        self, offers: list[_Offer], base: int, n_decoding: int, in_flight: int, price_passes: bool
    ) -> list[int]:
        """Proposals per offer, added while each addition pays (``price_passes``: counting the passes it adds)."""
        tokens = float(n_decoding)  # expected tokens of the step: one per decoding sequence, plus accepted ones
        per_pass = self.cost.per_pass() if price_passes else 0.0
        # A draft model's proposals also cost its own decode, before the step.
        unit = [self.cost.per_row() + (self.draft_secs if o.tokens is None else 0.0) for o in offers]
        rates = [o.state.rate for o in offers]
        # NOTE: speculative.min_tokens proposals go in whatever they cost (capped by max_tokens and what the source
        # found); the policy decides only about the rest.
        takes = [min(o.state.settings.min_tokens, o.available) for o in offers]
        step_rows = [1] * n_decoding  # rows of each decoding sequence, in plan order
        for o, k in zip(offers, takes):
            step_rows[o.index] += k
        passes = count_passes(step_rows)
        rows = sum(takes)
        tokens += _expected_accepted(offers, takes)
        while True:
            moves = [(k,) for k, o in enumerate(offers) if takes[k] < o.available]
            if price_passes:
                levels: dict[int, list[int]] = {}
                for (k,) in moves:
                    levels.setdefault(takes[k], []).append(k)
                moves += [tuple(group) for group in levels.values() if len(group) > 1]
            best: tuple[float, float, float, tuple[int, ...], int] | None = None  # gain/cost, gain, cost, who, passes
            for move in moves:
                after, gain, cost = 1, 0.0, 0.0
                for k in move:
                    gain += rates[k] ** (takes[k] + 1)
                    cost += unit[k]
                    step_rows[offers[k].index] += 1
                if price_passes:
                    after = count_passes(step_rows)
                    cost += per_pass * (after - passes)
                for k in move:
                    step_rows[offers[k].index] -= 1
                ratio = gain / cost if cost > 0 else math.inf
                if best is None or ratio > best[0]:
                    best = (ratio, gain, cost, move, after)
            rate_now = in_flight * tokens / self.cost.time(base, rows, passes - 1)  # tokens per second of the step
            if best is None or best[1] <= GAIN_MARGIN * rate_now * best[2]:
                return takes
            _, gain, _, move, passes = best
            for k in move:
                takes[k] += 1
                step_rows[offers[k].index] += 1
            tokens += gain
            rows += len(move)

    def _value(self, offers: list[_Offer], takes: list[int], base: int, n_decoding: int, in_flight: int) -> float:
        """What ``_greedy``'s rule climbs: log expected tokens - in_flight x log step seconds (its derivative is
        the rule gain / tokens > in_flight x cost / time), with every row and pass priced."""
        tokens = n_decoding + _expected_accepted(offers, takes)
        step_rows = [1] * n_decoding
        for o, k in zip(offers, takes):
            step_rows[o.index] += k
        drafting = sum(k for o, k in zip(offers, takes) if o.tokens is None) * self.draft_secs
        secs = self.cost.time(base, sum(takes), count_passes(step_rows) - 1) + drafting
        return math.log(tokens) - in_flight * math.log(secs)

    async def _draft(self, seq: Sequence, k: int) -> list[int]:
        assert self.draft is not None
        start = time.perf_counter()
        tokens = await self.draft.propose(seq.id, list(seq.tokens), k)
        per_token = (time.perf_counter() - start) / max(len(tokens), 1)
        self.draft_secs += COST_WEIGHT * (per_token - self.draft_secs) if self.draft_secs else per_token
        return tokens

    async def forget(self, seq: Sequence) -> None:
        """A finished sequence: the draft model frees its KV."""
        if self.draft is not None and seq.speculation is not None and seq.speculation.source == "draft":
            await self.draft.release(seq.id)

    def observe_step(self, plan: list[PlannedStep], secs: float) -> None:
        """A step went through every stage in ``secs``: decode steps (no prompt chunk) feed the cost fit."""
        if plan and all(p.n == 1 for p in plan):
            self.cost.observe(len(plan), sum(len(p.draft) for p in plan), secs, _extra_passes(plan))

    def record(self, p: PlannedStep, accepted: int) -> None:
        """The outcome of a verifying step: ``accepted`` of ``p.draft`` were kept."""
        st = p.seq.speculation
        if st is None or not p.draft:
            return
        k = len(p.draft)
        source = st.source
        st.proposed += k
        st.accepted += accepted
        st.accepted_w = VERIFY_DECAY * st.accepted_w + accepted
        st.rejected_w = VERIFY_DECAY * st.rejected_w + (1.0 if accepted < k else 0.0)
        totals = self.totals.setdefault(source, SourceTotals())
        totals.proposed += k
        totals.accepted += accepted
        totals.steps += 1
        self.metrics.spec_proposed.labels(source=source).inc(k)
        self.metrics.spec_accepted.labels(source=source).inc(accepted)
        self.metrics.spec_accepted_length.labels(source=source).observe(accepted)

    def view(self) -> dict:
        """For ``/v1/cluster``: the configuration, the cost fit and the acceptance so far, per proposal source."""
        all_ = SourceTotals(
            proposed=sum(t.proposed for t in self.totals.values()),
            accepted=sum(t.accepted for t in self.totals.values()),
            steps=sum(t.steps for t in self.totals.values()),
        )
        return {
            "method": self.cfg.method,
            "max_tokens": self.cfg.max_tokens,
            "draft_model": self.draft.path.name if self.draft is not None else None,
            **all_.view(),
            "step_ms_per_row": round(self.cost.per_row() * 1000, 3),
            "sources": {name: t.view() for name, t in self.totals.items()},
        }
