"""The coordinator's Prometheus metrics (names from the original spec)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from chatloop.coordinator.live_stats import LiveStats
from chatloop.metrics_util import LATENCY_BUCKETS, ProcessGauges

TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5)


class CoordinatorMetrics:
    def __init__(self, model: str) -> None:
        self.registry = r = CollectorRegistry()
        self.model = model
        self.requests = Counter("inference_requests", "Inference requests by outcome", ["model", "status"], registry=r)
        self.request_duration = Histogram(
            "inference_request_duration_seconds", "Whole request time", ["model"], buckets=LATENCY_BUCKETS, registry=r
        ).labels(model=model)
        self.tokens_generated = Counter("inference_tokens_generated", "Generated tokens", ["model"], registry=r).labels(
            model=model
        )
        self.prompt_tokens = Counter("inference_prompt_tokens", "Prompt tokens", ["model"], registry=r).labels(
            model=model
        )
        self.tokens_per_second = Gauge(
            "inference_tokens_per_second", "Generated tokens/s over the last 10 s", ["model"], registry=r
        ).labels(model=model)
        self.ttft = Histogram(
            "inference_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(model=model)
        self.itl = Histogram(
            "inference_inter_token_latency_seconds",
            "Time between tokens of a stream",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        ).labels(model=model)
        self.routed = Counter(
            "coordinator_requests_routed", "Sequences routed to a replica", ["stage", "worker"], registry=r
        )
        self.active_workers = Gauge("coordinator_active_workers", "Replicas in routing", registry=r)
        self.unhealthy_workers = Gauge("coordinator_unhealthy_workers", "Replicas out of routing", registry=r)
        self.worker_response_time = Histogram(
            "coordinator_worker_response_time_seconds",
            "Forward call round trip",
            ["stage", "worker"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("coordinator_queue_depth", "Requests waiting for admission", registry=r)
        self.active_sequences = Gauge("coordinator_active_sequences", "Sequences generating", registry=r)
        self.ring_steps = Counter(
            "coordinator_ring_steps",
            "Steps the last stage started with its sampled tokens, taken over by the coordinator (ring_steps)",
            registry=r,
        )
        self.failovers = Counter(
            "coordinator_failovers", "Sequences moved to another replica and replayed", ["stage"], registry=r
        )
        self.release_failures = Counter(
            "coordinator_release_failures",
            "Releases a replica did not confirm (its KV stays until the stage reaps idle sequences)",
            registry=r,
        )
        self.prefix_hits = Counter("coordinator_prefix_cache_hits", "Requests that reused a cached prefix", registry=r)
        self.prefix_hit_tokens = Counter(
            "coordinator_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache", registry=r
        )
        self.prefix_evictions = Counter(
            "coordinator_prefix_cache_evictions", "Prefix cache entries evicted", registry=r
        )
        self.prefix_cached_tokens = Gauge(
            "coordinator_prefix_cache_tokens", "Tokens the prefix cache's entries hold (once per entry)", registry=r
        )
        self.prefix_entries = Gauge("coordinator_prefix_cache_entries", "Prefix cache entries", registry=r)
        self.spec_proposed = Counter(
            "coordinator_speculative_proposed_tokens", "Proposed tokens sent for verification", ["source"], registry=r
        )
        self.spec_accepted = Counter(
            "coordinator_speculative_accepted_tokens", "Proposed tokens the last stage accepted", ["source"], registry=r
        )
        self.spec_accepted_length = Histogram(
            "coordinator_speculative_accepted_length",
            "Proposals accepted per verifying step (mean accepted length = sum / count)",
            ["source"],
            buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 62),
            registry=r,
        )
        self.process = ProcessGauges(r, {"component": "coordinator"})
        self.live = LiveStats()  # the last minute, for the cluster page (/v1/cluster/live)
