"""The stage's Prometheus metrics (names from the original spec)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from chatloop.metrics_util import LATENCY_BUCKETS, ProcessGauges

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class StageMetrics:
    def __init__(self, stage: str, worker: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"stage": stage, "worker": worker}
        names = list(labels)
        r = self.registry
        self.forward_duration = Histogram(
            "worker_forward_duration_seconds",
            "Time of one llama_decode batch",
            names,
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.queue_time = Histogram(
            "worker_queue_time_seconds",
            "Time a forward call waited before its decode",
            names,
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.queue_depth = Gauge("worker_queue_depth", "Forward calls waiting", names, registry=r).labels(**labels)
        self.batch_size = Histogram(
            "worker_batch_size", "Sequences per llama_decode", names, buckets=BATCH_BUCKETS, registry=r
        ).labels(**labels)
        self.live_sequences = Gauge("worker_live_sequences", "Sequences holding KV cache", names, registry=r).labels(
            **labels
        )
        self.kv_used = Gauge("worker_kv_cache_used_tokens", "KV cache positions in use", names, registry=r).labels(
            **labels
        )
        # NOTE: more passes than decodes means sequences stepped together hold scattered slots (engine/slots.py).
        self.ubatches = Counter(
            "worker_ubatches", "Passes over the weights (llama.cpp ubatches) the decodes took", names, registry=r
        ).labels(**labels)
        self.window_expired = Counter(
            "worker_batch_window_expired",
            "Batches sent when the batching window ran out before every expected sequence had a call waiting",
            names,
            registry=r,
        ).labels(**labels)
        self.requests = Counter("worker_forward_requests", "Forward calls by outcome", [*names, "status"], registry=r)
        self._by_status: dict[str, Counter] = {}  # NOTE: children cached: count() runs on every forward call
        self.labels = labels
        self.process = ProcessGauges(r, labels)

    def counter(self, name: str, documentation: str):
        """A counter of this stage's (its labels), in its registry: for parts of the stage that count their own."""
        return Counter(name, documentation, list(self.labels), registry=self.registry).labels(**self.labels)

    def count(self, status: str) -> None:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self.requests.labels(**self.labels, status=status)
        child.inc()
