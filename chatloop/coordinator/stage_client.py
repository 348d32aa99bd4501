"""The coordinator's HTTP calls to stage replicas: forward, release, info probe and vocabulary.

Every failed call becomes a ``StageCallError`` whose ``failure`` says whom it counts against: the replica
(it is unreachable, slow, broken or speaks another protocol), nobody (busy: try again), the sequence's KV
(replay it) or the request itself (a step the stage can never serve).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time

import aiohttp
import numpy as np

from chatloop.config import CoordinatorConfig
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.http_util import new_traceparent
from chatloop.protocol.frames import CONTENT_TYPE, FrameError
from chatloop.protocol.messages import (
    ErrorCode,
    HiddenReply,
    SeqStep,
    TokensReply,
    decode_reply,
    encode_forward,
    parse_error,
    release_body,
)

log = logging.getLogger(__name__)


class CallFailure(enum.Enum):
    CONNECT = "connect"  # refused, reset or closed connection
    TIMEOUT = "timeout"  # no answer within the step deadline
    SERVER = "server"  # the stage failed (decode error, 5xx)
    PROTOCOL = "protocol"  # a frame the other side could not read (version skew, corrupt reply, bad token)
    KV_MISSING = "kv_missing"  # the stage lost the sequence's KV (restart, reaping): replay it
    BUSY = "busy"  # no room, queue full, draining, or a raced cancel: try again later
    INVALID = "invalid"  # a step the stage can never serve (past its context, sampler settings): the request's fault

    @property
    def replica_fault(self) -> bool:
        return self in (CallFailure.CONNECT, CallFailure.TIMEOUT, CallFailure.SERVER, CallFailure.PROTOCOL)


_FAILURE_OF_CODE: dict[ErrorCode, CallFailure] = {
    ErrorCode.BAD_FRAME: CallFailure.PROTOCOL,
    ErrorCode.UNAUTHORIZED: CallFailure.PROTOCOL,
    ErrorCode.BAD_REQUEST: CallFailure.INVALID,
    ErrorCode.KV_MISSING: CallFailure.KV_MISSING,
    ErrorCode.CAPACITY: CallFailure.BUSY,
    ErrorCode.QUEUE_FULL: CallFailure.BUSY,
    ErrorCode.DRAINING: CallFailure.BUSY,
    ErrorCode.CANCELLED: CallFailure.BUSY,
    ErrorCode.DECODE_FAILED: CallFailure.SERVER,
}


def failure_of_code(code: ErrorCode) -> CallFailure:
    """Whom a stage's error code counts against (also for the chain's error frames)."""
    return _FAILURE_OF_CODE.get(code, CallFailure.PROTOCOL)


class StageCallError(Exception):
    def __init__(self, failure: CallFailure, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.failure = failure
        self.status = status


class StageClient:
    """One ``aiohttp`` session for every call to every replica (opened by ``start``, closed by ``close``)."""

    def __init__(self, cfg: CoordinatorConfig, metrics: CoordinatorMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self._headers = {"X-ChatLoop-Token": cfg.security.cluster_token} if cfg.security.cluster_token else {}
        self.deadlines = StepDeadlines(cfg)

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_secs)
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=64, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, headers=self._headers)

    async def close(self) -> None:
        if self.session:
            await self.session.close()

    @property
    def open(self) -> bool:
        return self.session is not None and not self.session.closed

    async def forward(
        self,
        url: str,
        name: str,
        stage: int,
        steps: list[SeqStep],
        data: np.ndarray,
        traces: list[str],
        want: str = "f32",
    ) -> HiddenReply | TokensReply:
        """One forward call (``want``: dtype of the hidden rows to send back); raises ``StageCallError``."""
        assert self.session is not None
        headers = {"Content-Type": CONTENT_TYPE}
        if traces:
            # One call carries many sequences: the first trace goes in traceparent, all of them in X-ChatLoop-Traces.
            headers["traceparent"] = new_traceparent(traces[0])
            headers["X-ChatLoop-Traces"] = ",".join(traces[:64])
        body = encode_forward(steps, data, want)
        # NOTE: proposed rows (speculation) do not make a decode step a prefill: its usual time is a decode's.
        kind = "decode" if len(data) - sum(len(s.draft) for s in steps) <= len(steps) else "prefill"
        deadline = self.deadlines.get(url, kind)
        timeout = aiohttp.ClientTimeout(total=deadline, sock_connect=self.cfg.connect_timeout_secs)
        start = time.perf_counter()
        try:
            async with self.session.post(f"{url}/v1/forward", data=body, timeout=timeout, headers=headers) as resp:
                payload = await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            raise StageCallError(CallFailure.TIMEOUT, f"{name}: no answer within {deadline:.2f} s") from None
        except aiohttp.ClientError as exc:
            raise StageCallError(CallFailure.CONNECT, f"{name}: {describe(exc)}") from None
        elapsed = time.perf_counter() - start
        self.metrics.worker_response_time.labels(stage=str(stage), worker=name).observe(elapsed)
        if status == 200:
            self.deadlines.observe(url, kind, elapsed)
        else:
            code, message = parse_error(payload)
            failure = _FAILURE_OF_CODE.get(code) if code else None
            if failure is None:
                failure = CallFailure.SERVER if status >= 500 else CallFailure.PROTOCOL
            raise StageCallError(failure, f"{name}: {status} {message}", status)
        try:
            return decode_reply(payload)
        except FrameError as exc:
            raise StageCallError(CallFailure.PROTOCOL, f"{name}: bad reply frame: {exc}") from None

    async def release(self, url: str, name: str, seq_ids: list[int], alive: bool = True) -> bool:
        """Free sequences at a replica; one retry. A replica that is down has lost them anyway (``alive`` False:
        logged at debug level), but a live one that missed the release holds their KV until its idle reaper
        runs: say so, and count it."""
        if not seq_ids or not self.open:
            return True
        timeout = aiohttp.ClientTimeout(total=5, sock_connect=self.cfg.connect_timeout_secs)
        problem = ""
        for attempt in range(2):
            try:
                assert self.session is not None
                async with self.session.post(f"{url}/v1/release", json=release_body(seq_ids), timeout=timeout) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return True
                    problem = f"answered {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
                problem = describe(exc)
            if attempt == 0:
                await asyncio.sleep(0.2)
        if not alive:
            log.debug("release of %d sequence(s) on %s (down) failed: %s", len(seq_ids), name, problem)
            return False
        log.warning("release of %d sequence(s) on %s failed: %s", len(seq_ids), name, problem)
        self.metrics.release_failures.inc()
        return False

    async def info(self, url: str) -> dict:
        """``GET /v1/info``; raises ``StageCallError``."""
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(
            total=max(self.cfg.connect_timeout_secs, 1.0) * 2, sock_connect=self.cfg.connect_timeout_secs
        )
        try:
            async with self.session.get(f"{url}/v1/info", timeout=timeout) as resp:
                if resp.status != 200:
                    raise StageCallError(CallFailure.SERVER, f"/v1/info answered {resp.status}", resp.status)
                info = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise StageCallError(CallFailure.CONNECT, describe(exc)) from None
        if not isinstance(info, dict):
            raise StageCallError(CallFailure.PROTOCOL, "/v1/info is not a JSON object")
        return info

    async def vocab(self, url: str) -> bytes:
        """The tensor-free vocabulary GGUF of a stage-0 replica; raises ``StageCallError``."""
        assert self.session is not None
        try:
            async with self.session.get(f"{url}/v1/vocab", timeout=aiohttp.ClientTimeout(total=60)) as resp:
                if resp.status != 200:
                    raise StageCallError(CallFailure.SERVER, f"/v1/vocab answered {resp.status}", resp.status)
                return await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise StageCallError(CallFailure.CONNECT, describe(exc)) from None


class StepDeadlines:
    """How long a forward call may take before its replica counts as stalled (a hung process, a black-holed link).

    A call's deadline is ``step_timeout_factor`` times that replica's recent time for calls of its kind (decode:
    one row per sequence; prefill: prompt chunks), never below ``step_timeout_floor_secs`` nor above
    ``step_timeout_secs``; before a replica has answered such a call, the upper bound applies. So a frozen replica
    is noticed within seconds, while a slow machine or a long prompt chunk is given the time it needs.
    """

    ALPHA = 0.2  # weight of the newest observation in the moving average

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg
        self._typical: dict[tuple[str, str], float] = {}

    def get(self, url: str, kind: str) -> float:
        typical = self._typical.get((url, kind))
        if typical is None:
            return self.cfg.step_timeout_secs
        scaled = self.cfg.step_timeout_factor * typical
        return min(self.cfg.step_timeout_secs, max(self.cfg.step_timeout_floor_secs, scaled))

    def observe(self, url: str, kind: str, seconds: float) -> None:
        old = self._typical.get((url, kind))
        self._typical[(url, kind)] = seconds if old is None else old + self.ALPHA * (seconds - old)


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
