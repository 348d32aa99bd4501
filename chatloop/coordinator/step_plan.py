"""What one step of a micro-batch sends: for each member, which of its tokens go through the stages now."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chatloop.coordinator.sequence import Sequence


@dataclass(frozen=True)
class PlannedStep:
    seq: Sequence
    pos: int  # position of the first row (= what every stage of the route already holds)
    n: int  # rows of this sequence in the step
    sample: bool  # the step reaches the end of the sequence's known tokens: the last stage samples the next one

    def token_ids(self) -> np.ndarray:
        return np.asarray(self.seq.tokens[self.pos : self.pos + self.n], dtype=np.int32)


def plan_step(members: list[Sequence], prefill_chunk_tokens: int) -> list[PlannedStep]:
    """Decodes first (one row each), then prompt chunks within ``prefill_chunk_tokens`` rows in all.

    A long new prompt thus delays the running sequences by at most one chunk per step.
    """
    plan = []
    budget = prefill_chunk_tokens
    needs = [(len(s.tokens) - s.n_cached, s) for s in members if not s.done]
    needs.sort(key=lambda x: x[0])
    for remaining, seq in needs:
        if remaining <= 0:
            continue
        if remaining == 1:
            n = 1
        else:
            n = min(remaining, budget)
            if n <= 0:
                continue
            budget -= n
        plan.append(PlannedStep(seq, seq.n_cached, n, seq.n_cached + n == len(seq.tokens)))
    return plan
