"""Rolling one-minute figures for the live cluster page: tokens/s, time to first token and inter-token latency
percentiles.

Prometheus histograms answer "since start" and need a scraper to turn into rates; the page wants "now", so the
scheduler also hands every sampled token to a ``LiveStats``, which keeps the last ``window_secs`` of them.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Protocol

WINDOW_SECS = 60.0  # what "the last minute" on the cluster page means
RATE_SECS = 10.0  # tokens/s is measured over this much (short enough to show a burst ending)
MAX_SAMPLES = 200_000  # bound on memory if tokens arrive very fast: the oldest samples go first


class _TimedSequence(Protocol):
    created: float
    first_token_at: float | None
    last_token_at: float | None


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending list; None when it is empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class LiveStats:
    def __init__(self, window_secs: float = WINDOW_SECS, clock=time.monotonic) -> None:
        self.window_secs = window_secs
        self._clock = clock
        self._tokens: deque[float] = deque(maxlen=MAX_SAMPLES)  # time of every sampled token
        self._ttft: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (time, seconds)
        self._itl: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)

    def on_token(self, seq: _TimedSequence, now: float) -> None:
        """Record a token of ``seq`` sampled at ``now``; call before the scheduler updates its timestamps."""
        self._tokens.append(now)
        if seq.first_token_at is None:
            self._ttft.append((now, now - seq.created))
        elif seq.last_token_at is not None:
            self._itl.append((now, now - seq.last_token_at))

    def _trim(self, now: float) -> None:
        edge = now - self.window_secs
        for q in (self._ttft, self._itl):
            while q and q[0][0] < edge:
                q.popleft()
        while self._tokens and self._tokens[0] < edge:
            self._tokens.popleft()

    def snapshot(self) -> dict:
        """Figures over the window; latencies in milliseconds, None when nothing was measured."""
        now = self._clock()
        self._trim(now)
        recent = 0
        for t in reversed(self._tokens):
            if t < now - RATE_SECS:
                break
            recent += 1
        out: dict = {
            "window_secs": self.window_secs,
            "tokens_per_second": round(recent / RATE_SECS, 2),
            "tokens_in_window": len(self._tokens),
        }
        for name, q in (("ttft_ms", self._ttft), ("itl_ms", self._itl)):
            values = sorted(v for _, v in q)
            out[name] = {
                "count": len(values),
                **{f"p{p}": _ms(percentile(values, p)) for p in (50, 90, 99)},
            }
        return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)
