"""How ``chatloop serve`` divides this machine's cores between the replicas of a stage.

Replicas of one stage decode at the same time (each serves other requests), so if each of them ran
llama.cpp with every core, R replicas would run R x cores threads on the cores: OpenMP barriers then
wait for descheduled threads (measured on 2 cores: concurrency 8 fell from ~130 to 25 tok/s with two
replicas per stage). Each replica r therefore gets share r of the cores, disjoint from the other replicas'
shares. Stages at different positions in the chain may use the same share: a sequence's step goes
through them one after another, so they decode in turn rather than at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from chatloop.config import ClusterConfig

log = logging.getLogger(__name__)


def replica_core_shares(replicas: int, cores: Sequence[int]) -> list[tuple[int, ...]]:
    """Split ``cores`` into ``replicas`` disjoint, contiguous, near-equal shares (the first ones get one more
    core when they do not divide evenly). With more replicas than cores, each replica gets one core and
    replicas r and r + len(cores) share it: oversubscription that cannot be avoided, kept as even as possible.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be 1 or more, got {replicas}")
    ordered = sorted(set(cores))
    if not ordered:
        raise ValueError("no cores to divide")
    if replicas >= len(ordered):
        return [(ordered[r % len(ordered)],) for r in range(replicas)]
    base, extra = divmod(len(ordered), replicas)
    shares, start = [], 0
    for r in range(replicas):
        size = base + (1 if r < extra else 0)
        shares.append(tuple(ordered[start : start + size]))
        start += size
    return shares


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity mask: a container's or taskset's cpuset)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def format_cores(share: Sequence[int]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"`` (the ``cpu_cores`` syntax)."""
    parts: list[str] = []
    ordered = sorted(share)
    start = prev = ordered[0]
    for c in [*ordered[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(parts)


def auto_replica_shares(cfg: ClusterConfig, stage_index: int, cores: Sequence[int]) -> list[tuple[int, ...]] | None:
    """The cores of each replica of stage ``stage_index`` when ``chatloop serve`` chooses them: only for a
    stage with 2 or more replicas and no thread or core settings anywhere in ``cfg`` (those win as given)."""
    per = cfg.stages[stage_index] if stage_index < len(cfg.stages) else None
    replicas = per.replicas if per else 1
    perf = cfg.performance
    explicit = (per and (per.cpu_cores or per.n_threads)) or perf.cpu_cores or perf.n_threads
    if replicas < 2 or explicit or perf.enable_cpu_pinning or perf.numa_node is not None:
        return None
    return replica_core_shares(replicas, cores)
