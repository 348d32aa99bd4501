"""Why a stage runtime refuses a forward call. Each refusal leaves every sequence as it was before the call.

``StepRefused`` is the base: the stage answers it with an error code (``protocol.messages.ErrorCode``). Any other
exception out of a forward call is a fault of the stage itself (llama.cpp, or a bug) and is answered as one.
"""

from __future__ import annotations


class StepRefused(Exception):
    """A forward call this stage will not run as asked."""


class InvalidStepError(StepRefused, ValueError):
    """A step that can never succeed here (rows that do not match the steps, settings the sampler cannot apply)."""


class ContextOverflowError(InvalidStepError):
    """A step would take a sequence past the context this stage holds per sequence."""


class KVMissingError(StepRefused):
    """A step refers to positions this stage has no KV cache for (for example after a restart)."""

    def __init__(self, seq_id: int, have: int, pos: int) -> None:
        super().__init__(f"sequence {seq_id}: step starts at position {pos} but this stage holds {have} positions")
        self.seq_id = seq_id


class CapacityError(StepRefused):
    """No sequence slot or KV cache room left for a step (for now: retry later)."""
