"""The stage replicas as the coordinator sees them: HTTP calls, health checks, routing state.

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

import aiohttp
import numpy as np

from chatloop.config import CoordinatorConfig
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.http_util import new_traceparent
from chatloop.wire import CONTENT_TYPE, FrameError, decode_frame, encode_frame

log = logging.getLogger(__name__)

# Failure kinds that say something about the replica itself (count towards unhealthy).
REPLICA_FAULTS = {"connect", "timeout", "server", "protocol"}


class StageCallError(Exception):
    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = (
            kind  # connect | timeout | server | protocol | kv_missing | capacity | bad_request | cancelled | draining
        )
        self.status = status


@dataclass(eq=False)
class Replica:
    stage: int
    url: str
    healthy: bool = False  # in routing
    draining: bool = False  # alive but taking no new sequences
    mismatch: str | None = None  # refused: serves another file than its stage's other replicas
    failures: int = 0  # consecutive
    successes: int = 0  # consecutive
    sequences: int = 0  # sequences routed here now
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
        self.session: aiohttp.ClientSession | None = None
        self._headers = {"X-ChatLoop-Token": cfg.security.cluster_token} if cfg.security.cluster_token else {}
        self._task: asyncio.Task | None = None
        self.changed = asyncio.Event()  # set whenever a replica's state changes

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_secs)
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=64, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, headers=self._headers)
        await self.check_all()
        self._task = asyncio.get_running_loop().create_task(self._health_loop(), name="health-checks")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.session:
            await self.session.close()

    @property
    def replicas(self) -> list[Replica]:
        return [r for reps in self.stages for r in reps]

    def ready(self) -> bool:
        return all(any(r.routable() for r in reps) for reps in self.stages)

    def pick(self, stage: int) -> Replica | None:
        """The least loaded routable replica of ``stage``."""
        candidates = [r for r in self.stages[stage] if r.routable()]
        return min(candidates, key=lambda r: (r.sequences, r.failures)) if candidates else None

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
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(
            total=max(self.cfg.connect_timeout_secs, 1.0) * 2, sock_connect=self.cfg.connect_timeout_secs
        )
        try:
            async with self.session.get(f"{r.url}/v1/info", timeout=timeout) as resp:
                if resp.status != 200:
                    raise StageCallError("server", f"/v1/info answered {resp.status}", resp.status)
                info = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, StageCallError, ValueError) as exc:
            self.report_failure(r, f"health check: {_describe(exc)}")
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

    def _accept_info(self, r: Replica, info: dict) -> None:
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
        self._update_gauges()

    def _update_gauges(self) -> None:
        healthy = sum(1 for r in self.replicas if r.routable())
        self.metrics.active_workers.set(healthy)
        self.metrics.unhealthy_workers.set(len(self.replicas) - healthy)

    # -- calls -----------------------------------------------------------------------------------------

    async def forward(
        self, r: Replica, header: dict, tensor: np.ndarray, traces: list[str] | None = None
    ) -> tuple[dict, np.ndarray | None]:
        assert self.session is not None
        body = encode_frame(header, tensor)
        headers = {"Content-Type": CONTENT_TYPE}
        if traces:
            # One call carries many sequences: the first trace goes in traceparent, all of them in X-ChatLoop-Traces.
            headers["traceparent"] = new_traceparent(traces[0])
            headers["X-ChatLoop-Traces"] = ",".join(traces[:64])
        start = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=self.cfg.step_timeout_secs, sock_connect=self.cfg.connect_timeout_secs)
        try:
            async with self.session.post(f"{r.url}/v1/forward", data=body, timeout=timeout, headers=headers) as resp:
                payload = await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            raise StageCallError("timeout", f"{r.name}: no answer within {self.cfg.step_timeout_secs} s") from None
        except aiohttp.ClientError as exc:
            raise StageCallError("connect", f"{r.name}: {_describe(exc)}") from None
        self.metrics.worker_response_time.labels(stage=str(r.stage), worker=r.name).observe(time.perf_counter() - start)
        if status != 200:
            code, message = _error_of(payload)
            kind = {
                "kv_missing": "kv_missing",
                "capacity": "capacity",
                "queue_full": "capacity",
                "cancelled": "cancelled",
                "draining": "draining",
            }.get(code or "")
            if kind is None:
                kind = "server" if status >= 500 else "bad_request"
            raise StageCallError(kind, f"{r.name}: {status} {message}", status)
        try:
            return decode_frame(payload)
        except FrameError as exc:
            raise StageCallError("protocol", f"{r.name}: bad reply frame: {exc}") from None

    async def release(self, r: Replica, seqs: list[int]) -> None:
        """Best effort: a replica that is down has lost the sequences anyway."""
        if not seqs or self.session is None or self.session.closed:
            return
        try:
            timeout = aiohttp.ClientTimeout(total=5, sock_connect=self.cfg.connect_timeout_secs)
            async with self.session.post(f"{r.url}/v1/release", json={"seqs": seqs}, timeout=timeout) as resp:
                await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
            log.debug("release on %s failed: %s", r.name, _describe(exc))

    async def fetch_vocab(self) -> bytes:
        """The tensor-free vocabulary GGUF from a replica of stage 0."""
        assert self.session is not None
        last = "no replica of stage 0 answered"
        for r in self.stages[0]:
            try:
                async with self.session.get(f"{r.url}/v1/vocab", timeout=aiohttp.ClientTimeout(total=60)) as resp:
                    if resp.status == 200:
                        return await resp.read()
                    last = f"{r.name}: /v1/vocab answered {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last = f"{r.name}: {_describe(exc)}"
        raise RuntimeError(f"cannot fetch the vocabulary: {last}")

    def snapshot(self) -> list[dict]:
        return [
            {
                "stage": r.stage,
                "url": r.url,
                "name": r.name,
                "state": r.state(),
                "sequences": r.sequences,
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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _error_of(payload: bytes) -> tuple[str | None, str]:
    import json  # noqa: PLC0415

    try:
        err = json.loads(payload)["error"]
        return err.get("code"), str(err.get("message"))
    except (ValueError, KeyError, TypeError):
        return None, payload[:200].decode("utf-8", "replace")
