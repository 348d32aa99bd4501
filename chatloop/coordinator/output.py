"""Sampled tokens to what a client sees: text (valid UTF-8, stop strings held back), events, and the latency
metrics of a stream (time to first token, inter-token latency, tokens per second)."""

from __future__ import annotations

import time
from collections import deque

from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.sequence import Sequence, TokenEvent
from chatloop.engine.tokenizer import Tokenizer
from chatloop.protocol.messages import SampledToken

RATE_WINDOW_SECS = 10.0


class TokenOutput:
    def __init__(self, tokenizer: Tokenizer, metrics: CoordinatorMetrics) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics
        self._recent: deque[float] = deque()  # arrival times of the tokens of the last RATE_WINDOW_SECS

    def deliver(self, seq: Sequence, out: SampledToken) -> str | None:
        """Record ``out`` as the sequence's next token and queue its text; returns a finish reason
        ("stop", "length") when the sequence is complete, else None."""
        token = out.token
        now = time.monotonic()
        self.metrics.live.on_token(seq, now)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.created)
        elif seq.last_token_at is not None:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self._recent.append(now)
        self.metrics.tokens_generated.inc()
        seq.tokens.append(token)
        if self.tokenizer.is_eog(token):
            return "stop"
        text = seq.stream.feed(self.tokenizer.piece(token))
        seq.events.put_nowait(TokenEvent(token, text, out.logprob, out.top_logprobs))
        if seq.stream.stopped:
            return "stop"
        if seq.n_generated >= seq.max_tokens:
            return "length"
        return None

    def tokens_per_second(self) -> float:
        cutoff = time.monotonic() - RATE_WINDOW_SECS
        while self._recent and self._recent[0] < cutoff:
            self._recent.popleft()
        return len(self._recent) / RATE_WINDOW_SECS
