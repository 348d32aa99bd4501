"""Timestamps at the hops of a chain step, to see where a served token's time goes.

Off unless ``CHATLOOP_STEP_TRACE`` names a file prefix when the process starts; each process then appends
``<mark> <monotonic ns>`` lines to ``<prefix>.<pid>``. ``CLOCK_MONOTONIC`` is one clock for every process of a
machine, so the marks of the coordinator and of the stages line up into one timeline per step
(``scripts/bench_step_timeline.py`` runs a chain and prints the median time between consecutive marks).

Call sites test ``ENABLED`` first, so a server that is not traced pays one attribute load per mark.
"""

from __future__ import annotations

import atexit
import os
import time

ENV = "CHATLOOP_STEP_TRACE"
FLUSH_EVERY = 4096  # marks kept in memory between writes

_prefix = os.environ.get(ENV, "")
ENABLED = bool(_prefix)
_marks: list[tuple[str, int]] = []


def mark(name: str) -> None:
    """Record that this process reached ``name`` now."""
    _marks.append((name, time.monotonic_ns()))
    if len(_marks) >= FLUSH_EVERY:
        flush()


def flush() -> None:
    """Append the recorded marks to this process's file."""
    if not _marks:
        return
    lines = "".join(f"{name} {ns}\n" for name, ns in _marks)
    _marks.clear()
    with open(f"{_prefix}.{os.getpid()}", "a") as f:
        f.write(lines)


if ENABLED:
    atexit.register(flush)
