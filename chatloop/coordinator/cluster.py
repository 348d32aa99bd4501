"""The stage replicas as the coordinator sees them: health checks, routing, and which sequences each one serves.

A replica is marked unhealthy after ``failure_threshold`` consecutive failures (failed probes or failed
forward calls) and back in routing after ``recovery_threshold`` consecutive successful probes. Replicas of
one stage must serve the same file: the first replica seen fixes the stage's sha256 and any other is
refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from chatloop.config import CoordinatorConfig
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.stage_client import StageCallError, StageClient

log = logging.getLogger(__name__)


class NoReplicaError(Exception):
    """A stage has no replica in routing."""

    def __init__(self, stage: int) -> None:
        super().__init__(f"no healthy replica for stage {stage}")
        self.stage = stage


@dataclass(eq=False)
class Replica:
    stage: int
    url: str
    healthy: bool = False  # in routing
    draining: bool = False  # alive but taking no new sequences
    mismatch: str | None = None  # refused: serves another file than its stage's other replicas
    failures: int = 0  # consecutive
    successes: int = 0  # consecutive
    sequences: int = 0  # running sequences routed here now
    cached: int = 0  # prefix cache entries whose KV this replica holds
    last_error: str | None = None
    last_seen: float | None = None
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"stage-{self.stage}@{self.url.split('://', 1)[-1]}"

    def state(self) -> str:
        if self.mismatch:
            return "mismatch"
        if not self.healthy:
            return "unhealthy"
        return "draining" if self.draining else "healthy"

    def routable(self) -> bool:
        return self.healthy and not self.draining and self.mismatch is None


class Cluster:
    def __init__(self, cfg: CoordinatorConfig, metrics: CoordinatorMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.stages: list[list[Replica]] = [
            [Replica(k, url.rstrip("/")) for url in urls] for k, urls in enumerate(cfg.stages)
        ]
        self.stage_sha: list[str | None] = [None] * len(self.stages)
        self.client = StageClient(cfg, metrics)
        self._task: asyncio.Task | None = None
        self.changed = asyncio.Event()  # set whenever a replica's state changes
        # Called with (replica, why) when a replica loses its sequences: it went down, or restarted.
        self.on_lost: list = []

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.client.start()
        await self.check_all()
        self._task = asyncio.get_running_loop().create_task(self._health_loop(), name="health-checks")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()

    @property
    def replicas(self) -> list[Replica]:
        return [r for reps in self.stages for r in reps]

    def ready(self) -> bool:
        return all(any(r.routable() for r in reps) for reps in self.stages)

    def pick(self, stage: int) -> Replica | None:
        """The least loaded routable replica of ``stage``."""
        candidates = [r for r in self.stages[stage] if r.routable()]
        return min(candidates, key=lambda r: (r.sequences, r.failures)) if candidates else None

    def ensure_route(self, route: list[Replica | None]) -> list[tuple[int, Replica | None]]:
        """Give every stage of ``route`` a routable replica, in place. Returns (stage, replica it left) for each
        stage that changed (the old replica None for a new route); raises ``NoReplicaError`` (route unchanged
        from that stage on)."""
        changed = []
        for k, r in enumerate(route):
            if r is not None and r.healthy and r.mismatch is None:
                continue
            new = self.pick(k)
            if new is None:
                raise NoReplicaError(k)
            if r is not None:
                r.sequences -= 1
            new.sequences += 1
            route[k] = new
            self.metrics.routed.labels(stage=str(k), worker=new.name).inc()
            changed.append((k, r))
        return changed

    def join(self, route: list[Replica]) -> None:
        """A new sequence takes a ready-made route (a prefix cache hit): it counts on those replicas."""
        for k, r in enumerate(route):
            r.sequences += 1
            self.metrics.routed.labels(stage=str(k), worker=r.name).inc()

    def least_loaded(self, stage: int) -> int:
        loads = [r.sequences for r in self.stages[stage] if r.routable()]
        return min(loads) if loads else 0

    @staticmethod
    def slots_free(r: Replica) -> int:
        """Sequence slots the replica has left for new sequences (running and cached ones hold one each)."""
        slots = r.info.get("max_sequences")
        return (int(slots) if isinstance(slots, int) else 1 << 30) - r.sequences - r.cached

    def leave(self, route: list[Replica | None]) -> list[Replica]:
        """A sequence finished: it no longer counts on its replicas (returned, for releasing its KV there)."""
        left = [r for r in route if r is not None]
        for r in left:
            r.sequences -= 1
        return left

    def min_info(self, key: str) -> int | None:
        values = [int(r.info[key]) for r in self.replicas if r.routable() and key in r.info]
        return min(values) if values else None

    # -- health ----------------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_check_interval_secs)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._probe(r) for r in self.replicas))
        self._update_gauges()

    async def _probe(self, r: Replica) -> None:
        try:
            info = await self.client.info(r.url)
        except StageCallError as exc:
            self.report_failure(r, f"health check: {exc}")
            return
        self._accept_info(r, info)
        if r.mismatch:
            return
        r.draining = bool(info.get("draining"))
        r.last_seen = time.time()
        r.failures = 0
        r.successes += 1
        if not r.healthy and (r.successes >= self.cfg.recovery_threshold or r.last_error is None):
            r.healthy = True
            log.info("replica %s is healthy", r.name)
            self.changed.set()

    def _lost(self, r: Replica, why: str) -> None:
        for callback in self.on_lost:
            callback(r, why)

    def _accept_info(self, r: Replica, info: dict) -> None:
        if r.info and (info.get("pid"), info.get("started")) != (r.info.get("pid"), r.info.get("started")):
            self._lost(r, "restarted")
        sha = info.get("sha256")
        if info.get("stage_index") not in (None, r.stage):
            r.mismatch = f"serves stage {info.get('stage_index')}, configured as stage {r.stage}"
        elif self.stage_sha[r.stage] is None:
            self.stage_sha[r.stage] = sha
        elif sha != self.stage_sha[r.stage]:
            r.mismatch = f"file sha256 {str(sha)[:12]} differs from the stage's {str(self.stage_sha[r.stage])[:12]}"
        else:
            r.mismatch = None
        if r.mismatch:
            if r.healthy or r.last_error != r.mismatch:
                log.error("replica %s refused: %s", r.name, r.mismatch)
            r.healthy = False
            r.last_error = r.mismatch
        r.info = info

    def report_failure(self, r: Replica, message: str) -> None:
        r.failures += 1
        r.successes = 0
        r.last_error = message
        if r.healthy and r.failures >= self.cfg.failure_threshold:
            r.healthy = False
            log.warning("replica %s marked unhealthy after %d failures: %s", r.name, r.failures, message)
            self.changed.set()
            self._lost(r, "unhealthy")
        self._update_gauges()

    def mark_down(self, r: Replica, message: str) -> None:
        """A forward call failed: stop routing new work there at once (probes bring it back)."""
        r.failures = max(r.failures + 1, self.cfg.failure_threshold)
        r.successes = 0
        r.last_error = message
        if r.healthy:
            r.healthy = False
            log.warning("replica %s failed a forward call: %s", r.name, message)
            self.changed.set()
            self._lost(r, "failed a forward call")
        self._update_gauges()

    def _update_gauges(self) -> None:
        healthy = sum(1 for r in self.replicas if r.routable())
        self.metrics.active_workers.set(healthy)
        self.metrics.unhealthy_workers.set(len(self.replicas) - healthy)

    # -- calls ---------------------------------------------------------------------------------------------

    async def release(self, r: Replica, seq_ids: list[int]) -> None:
        await self.client.release(r.url, r.name, seq_ids, alive=r.healthy)

    async def fetch_vocab(self) -> bytes:
        """The tensor-free vocabulary GGUF from a replica of stage 0."""
        last = "no replica of stage 0 answered"
        for r in self.stages[0]:
            try:
                return await self.client.vocab(r.url)
            except StageCallError as exc:
                last = f"{r.name}: {exc}"
        raise RuntimeError(f"cannot fetch the vocabulary: {last}")

    def snapshot(self) -> list[dict]:
        return [
            {
                "stage": r.stage,
                "url": r.url,
                "name": r.name,
                "state": r.state(),
                "sequences": r.sequences,
                "cached_sequences": r.cached,
                "consecutive_failures": r.failures,
                "last_error": r.last_error,
                "last_seen": r.last_seen,
                "layers": [r.info.get("layer_start"), r.info.get("layer_end")] if r.info else None,
                "sha256": r.info.get("sha256"),
                "live_sequences": r.info.get("live_sequences"),
                "queue_depth": r.info.get("queue_depth"),
                "pid": r.info.get("pid"),
            }
            for r in self.replicas
        ]
