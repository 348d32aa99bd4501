"""Waiting in tests: poll for a state, never sleep a fixed time and hope, never time an operation by the wall clock.

The suite must pass on a busy machine (another build on the same cores, a CI runner shared with other jobs),
where anything can take several times longer than on a quiet one. So:

- expect a state by polling for it with ``wait_until`` and a generous deadline (tens of seconds) that only a
  real hang exceeds;
- where time is the point ("refused before doing the work", "stopped at the limit"), measure the CPU time of
  the thread doing the work (``thread_cpu_seconds``), which other processes cannot inflate;
- a timeout is only a guard against hanging forever, never what decides pass or fail on a normal run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

WAIT_SECS = 60.0  # default deadline of a wait: far beyond any normal run, even on a loaded machine


def wait_until(
    predicate: Callable[[], T], timeout: float = WAIT_SECS, interval: float = 0.1, what: str = "condition"
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something true, and return that.

    An ``OSError`` or ``ValueError`` from the predicate (a server not listening yet, a half-written file) counts
    as "not yet". After ``timeout`` seconds: ``TimeoutError`` naming ``what`` and the last answer.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, ValueError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met after {timeout:g} s (last: {last!r})")
        time.sleep(interval)


class CpuTime:
    """CPU seconds the current thread spent inside a ``thread_cpu_seconds()`` block (``.seconds``)."""

    seconds: float = 0.0


@contextlib.contextmanager
def thread_cpu_seconds() -> Iterator[CpuTime]:
    """Measure the CPU time of the current thread, which other processes on the machine cannot inflate.

    ``with thread_cpu_seconds() as cpu: work()`` then ``cpu.seconds``; measured also when ``work`` raises.
    """
    spent = CpuTime()
    start = time.thread_time()
    try:
        yield spent
    finally:
        spent.seconds = time.thread_time() - start
