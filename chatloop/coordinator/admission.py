"""Which waiting requests may start generating: a bounded first-come-first-served queue in front of the stages.

Admission is bounded by the number of sequences every stage can hold (one KV stream each) and, when
``kv_cache_tokens`` is set, by a shared budget of KV positions (each request reserves prompt + max_tokens).
A request that waits longer than ``queue_timeout_secs`` is refused.
"""

from __future__ import annotations

import time
from collections import deque

from chatloop.config import CoordinatorConfig
from chatloop.coordinator.cluster import Cluster
from chatloop.coordinator.sequence import Sequence


class AdmissionError(Exception):
    def __init__(self, message: str, status: int = 503, retry_after: int | None = 1) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Admission:
    def __init__(self, cfg: CoordinatorConfig, cluster: Cluster) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.waiting: deque[Sequence] = deque()
        self.active: set[Sequence] = set()
        self.reserved = 0  # KV positions the active sequences may come to hold
        self.cache = None  # the PrefixCache, whose entries also hold KV positions (evicted to make room)

    # -- capacity --------------------------------------------------------------------------------------

    def kv_budget(self) -> int:
        """Positions all admitted requests may reserve together; 0 = no shared budget (each sequence has its
        own KV stream of ``n_ctx_seq`` positions at every stage, so slots and context_limit() bound admission)."""
        return self.cfg.kv_cache_tokens

    def max_active(self) -> int:
        slots = self.cluster.min_info("max_sequences")
        return min(self.cfg.batching.max_batch_size, slots) if slots else self.cfg.batching.max_batch_size

    def context_limit(self) -> int:
        """Longest prompt + max_tokens one request may reserve."""
        limits = [
            x for x in (self.kv_budget(), self.cluster.min_info("n_ctx_seq"), self.cluster.min_info("n_ctx_train")) if x
        ]
        return min(limits) if limits else 0

    # -- queue -----------------------------------------------------------------------------------------

    def enqueue(self, seq: Sequence) -> None:
        """Queue a sequence; raises ``AdmissionError`` when the queue is full or the cluster not ready."""
        if not self.cluster.ready():
            raise AdmissionError("not ready: a stage has no healthy replica")
        if len(self.waiting) >= self.cfg.batching.max_queue_size:
            raise AdmissionError(f"server busy: {len(self.waiting)} requests already waiting")
        seq.deadline = time.monotonic() + self.cfg.batching.queue_timeout_secs
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move the head of the queue to the active set while there is room; returns the admitted sequences."""
        budget = self.kv_budget()
        limit = self.max_active()
        admitted = []
        while self.waiting and len(self.active) < limit:
            seq = self.waiting[0]
            if seq.done:
                self.waiting.popleft()
                continue
            if budget and self.cache is not None:
                excess = self.reserved + self.cache.tokens + seq.reserved - budget
                if excess > 0:
                    self.cache.evict_tokens(excess)  # cached prefixes give way to running work
            cached = self.cache.tokens if self.cache is not None else 0
            if budget and self.reserved + cached + seq.reserved > budget and self.active:
                break  # NOTE: first come, first served: later requests never overtake the head.
            self.waiting.popleft()
            seq.admitted_at = time.monotonic()
            seq.route = [None] * len(self.cluster.stages)
            self.active.add(seq)
            self.reserved += seq.reserved
            admitted.append(seq)
        return admitted

    def remove(self, seq: Sequence) -> bool:
        """Forget a finished or cancelled sequence; True when it was active (it held a route)."""
        if seq in self.active:
            self.active.discard(seq)
            self.reserved -= seq.reserved
            return True
        if seq in self.waiting:
            self.waiting.remove(seq)
        return False

    def expired(self) -> list[Sequence]:
        """Remove and return the waiting sequences whose queue timeout passed."""
        now = time.monotonic()
        late = [s for s in self.waiting if s.deadline < now]
        for seq in late:
            self.waiting.remove(seq)
        return late
