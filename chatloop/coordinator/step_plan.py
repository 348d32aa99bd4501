"""What one step of a micro-batch sends: for each member, which of its tokens go through the stages now."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chatloop.coordinator.sequence import Sequence
from chatloop.protocol.messages import BLOCK_ROWS


@dataclass(frozen=True)
class PlannedStep:
    seq: Sequence
    pos: int  # position of the first row (= what every stage of the route already holds)
    n: int  # rows of this sequence in the step
    sample: bool  # the step reaches the end of the sequence's known tokens: the last stage samples the next one
    draft: tuple[int, ...] = ()  # proposed tokens after those rows, for the last stage to verify (speculation.py)

    @property
    def rows(self) -> int:
        """Rows the stages compute for this sequence: its known tokens, then the proposals."""
        return self.n + len(self.draft)

    def token_ids(self) -> np.ndarray:
        known = self.seq.tokens[self.pos : self.pos + self.n]
        return np.asarray(known + list(self.draft) if self.draft else known, dtype=np.int32)


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
            n = _aligned(seq, min(remaining, budget))
            if n <= 0:
                continue
            budget -= n
        plan.append(PlannedStep(seq, seq.n_cached, n, seq.n_cached + n == len(seq.tokens)))
    return plan


def _aligned(seq: Sequence, n: int) -> int:
    """``n`` rows from ``seq.n_cached``, cut so that a chunk below the sequence's block_end ends on a whole block
    (every stage computes those positions in whole 64-row blocks; a chunk may not split one). A budget smaller
    than one block still moves the sequence by one block."""
    pos, be = seq.n_cached, seq.block_end
    end = pos + n
    if pos >= be or end >= be:
        return n
    end = end // BLOCK_ROWS * BLOCK_ROWS
    return max(end - pos, min(BLOCK_ROWS, be - pos))
