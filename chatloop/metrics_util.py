"""Shared Prometheus plumbing: a registry per app, process CPU/memory gauges and the /metrics handler."""

from __future__ import annotations

import os

import psutil
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

# Latency buckets from 1 ms to 2 min: per-token steps on one side, whole requests on the other.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ProcessGauges:
    """``worker_cpu_utilization_percent`` and ``worker_memory_used_bytes`` of this process, read at scrape."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self._proc = psutil.Process(os.getpid())
        self._proc.cpu_percent(None)
        names = list(labels)
        self.cpu = Gauge(
            "worker_cpu_utilization_percent", "CPU use of this process (100 = one core)", names, registry=registry
        ).labels(**labels)
        self.mem = Gauge(
            "worker_memory_used_bytes", "Resident memory of this process", names, registry=registry
        ).labels(**labels)

    def refresh(self) -> None:
        self.cpu.set(self._proc.cpu_percent(None))
        self.mem.set(self._proc.memory_info().rss)


def metrics_response(registry: CollectorRegistry) -> web.Response:
    resp = web.Response(body=generate_latest(registry))
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    resp.charset = "utf-8"
    return resp
