"""Figures of a run: percentiles, CPU seconds of processes, and a stage's own counters from ``/metrics``."""

from __future__ import annotations

import urllib.request

import numpy as np


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100, linear interpolation); NaN for no values."""
    return float(np.percentile(values, q)) if values else float("nan")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (all their threads) so far."""
    import psutil  # noqa: PLC0415

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU seconds of the process's main thread (a server's event loop; decodes run on other threads), from
    ``/proc/<pid>/task/<pid>/schedstat`` (nanoseconds, Linux)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def stage_counters(url: str, token: str | None = None) -> dict[str, float]:
    """Sums and counts of a stage's forward, queue-time and batch-size histograms (from ``/metrics``; ``token``:
    the cluster token of a stage that has one)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/metrics", headers=headers), timeout=5) as resp:
        text = resp.read().decode()
    wanted = {
        "worker_forward_duration_seconds_sum": "forward_s",
        "worker_forward_duration_seconds_count": "forwards",
        "worker_queue_time_seconds_sum": "queue_s",
        "worker_queue_time_seconds_count": "queued",
        "worker_batch_size_sum": "batch_rows",
        "worker_batch_size_count": "batches",
        "worker_ubatches_total": "passes",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return out


def counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}
