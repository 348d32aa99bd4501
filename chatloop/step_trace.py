"""Timestamps at the hops of a chain step, to see where a served token's time goes.

Off unless ``CHATLOOP_STEP_TRACE`` names a file prefix when the process starts; each process then appends
``<mark> <monotonic ns>`` lines to ``<prefix>.<pid>``. ``CLOCK_MONOTONIC`` is one clock for every process of a
machine, so the marks of the coordinator and of the stages line up into one timeline per step
(``scripts/bench_step_timeline.py`` runs a chain and prints the median time between consecutive marks).

Call sites test ``ENABLED`` first, so a server that is not traced pays one attribute load per mark.
"""

from __future__ import annotations

import atexit
import logging
import os
import time

log = logging.getLogger(__name__)

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
    global _marks
    # NOTE: swapped, not cleared: the event loop and the decode thread both mark, and a mark appended between a
    # join and a clear would be lost.
    marks, _marks = _marks, []
    if not marks:
        return
    lines = "".join(f"{name} {ns}\n" for name, ns in marks)
    path = f"{_prefix}.{os.getpid()}"
    try:
        with open(path, "a") as f:
            f.write(lines)
    except OSError as exc:  # a bad CHATLOOP_STEP_TRACE must not fail the step that happened to flush
        global ENABLED
        ENABLED = False
        log.warning("%s: cannot write step marks to %s (%s); step tracing is off", ENV, path, exc)


if ENABLED:
    atexit.register(flush)
