"""The event loop every ChatLoop server process runs on.

uvloop (libuv) by default: on the hot path a stage or the coordinator does little Python per frame, and much of
what it does is the loop's own machinery (socket reads and writes, callbacks, the hand-off to and from the decode
thread), which uvloop runs in C; ``scripts/bench_serve.py --event-loop uvloop,asyncio`` measures both in one run
(figures in scripts/README.md). ``CHATLOOP_EVENT_LOOP=asyncio`` selects the standard library's loop, e.g. to
compare, or where uvloop is not installed (it is a dependency on Linux and macOS only).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
ENV = "CHATLOOP_EVENT_LOOP"
CHOICES = ("uvloop", "asyncio")


class EventLoopError(ValueError):
    """``CHATLOOP_EVENT_LOOP`` names no loop this build can run."""


def chosen_loop() -> str:
    """The loop ``run`` will use: ``CHATLOOP_EVENT_LOOP`` when set, else uvloop when installed, else asyncio."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice and choice not in CHOICES:
        raise EventLoopError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        if choice == "uvloop":
            raise EventLoopError(f"{ENV}=uvloop, but uvloop is not installed (pip install uvloop)") from None
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    try:
        choice = chosen_loop()
    except EventLoopError:
        main.close()  # never awaited: say so quietly rather than with a RuntimeWarning
        raise
    log.debug("event loop: %s", choice)
    if choice == "uvloop":
        import uvloop  # noqa: PLC0415

        return uvloop.run(main)
    return asyncio.run(main)
