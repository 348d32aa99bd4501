"""What a served step costs a stage process beyond its decode, for ``chatloop bench-host``.

A stage's step is more than its ``llama_decode``: its event loop reads the frame from the stream, checks it, hands
the rows to the decode thread and sends the result on, and on a stage's own cores all of that runs in turn with
the decodes (about 1 ms a step on the development machine, against 10-20 ms decodes of the demo model: enough to
put a plan's prediction 20-30 % under what is served). So bench-host starts a real stage process on a timing
file (loopback, a fresh cluster token, this process's cores and quota), streams one-row steps to it as a coordinator
does, one at a time, and reads per step: the forward call's wall time as the stage reports it (the hand-off to the
decode thread and back included, and with it the wake-ups a core shared with other work delays) and the CPU time of
the process's main thread, which runs its event loop (the decode runs on its own threads). A step keeps the stage
busy for both: ``ServedStep.busy_ms``.

The two roles cost differently and are timed apart: a last stage samples and replies to the coordinator; a first or
middle stage passes its hidden states on to the next stage's stream (here a sink in this process, registered with
the stage as its peer, that takes each frame as the step's completion).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import numpy as np
import yaml
from aiohttp import web

from chatloop.http_util import free_port
from chatloop.modelfiles.gguf_info import read_gguf_info
from chatloop.modelfiles.manifest import load_manifest
from chatloop.protocol.chain import ChainResult, decode_reply, encode_chain
from chatloop.protocol.frames import FrameError, decode_frame
from chatloop.protocol.messages import step_to_wire
from chatloop.protocol.streams import COORD_HEADER, PEERS_PATH, ROLE_HEADER, STREAM_PATH, TOKEN_HEADER

log = logging.getLogger(__name__)

START_TIMEOUT_SECS = 120.0  # the stage process loads its file and answers /readyz
STEP_TIMEOUT_SECS = 60.0  # one step's reply
PROBE_TIMEOUT_SECS = 2.0  # one readiness probe while it starts
WARMUP_STEPS = 3  # steps before timing (first decodes page the weights in)
COORDINATOR_ID = "bench-host"


class ServedStepError(RuntimeError):
    """The stage process could not be started or driven; the message says which and why."""


@dataclass(frozen=True)
class ServedStep:
    """One served one-row step of a stage process, on average."""

    forward_ms: float  # wall time of the forward call (the stage's worker_forward_duration_seconds)
    loop_cpu_ms: float  # CPU time of the main thread: the event loop's work
    process_cpu_ms: float  # CPU time of the whole process (decode threads and event loop)

    @property
    def busy_ms(self) -> float:
        """Time the step keeps the stage busy: its forward call and its event loop's work, the loop's CPU time
        stretched as the decode's CPU time is to its wall time (a core shared with other work stretches both)."""
        decode_cpu = self.process_cpu_ms - self.loop_cpu_ms
        stretch = max(self.forward_ms / decode_cpu, 1.0) if decode_cpu > 0 else 1.0
        return self.forward_ms + self.loop_cpu_ms * stretch


def served_step(stage_file: pathlib.Path, threads: int, steps: int) -> ServedStep:
    """Time ``steps`` one-row steps served by a stage process on ``stage_file``.

    ``stage_file``: a stage of a converted folder of two or more stages that takes hidden states (not the first):
    the last stage is timed sampling and replying to the coordinator, a middle stage passing its rows on."""
    stages = load_manifest(stage_file.parent).stages
    names = [s.file for s in stages]
    if len(stages) < 2 or stage_file.name not in names[1:]:
        raise ServedStepError(f"{stage_file}: not a later stage (one that takes hidden states) of a converted model")
    index, n_embd = names.index(stage_file.name), read_gguf_info(stage_file).n_embd
    token = secrets.token_hex(16)
    port = free_port()
    with contextlib.ExitStack() as stack:
        work = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chatloop-bench-host-")))
        config = work / "stage.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "weights_path": str(stage_file),
                    "port": port,
                    "verify_sha256": False,
                    "max_sequences": 1,
                    "batching": {"batching_window_ms": 0},
                    "performance": {"n_threads": threads, "kv_cache_mb": 64},
                    "observability": {"log_level": "WARNING"},
                    "security": {"cluster_token": token},
                }
            )
        )
        log_file = (work / "stage.log").open("w")
        stack.callback(log_file.close)
        cmd = [sys.executable, "-m", "chatloop.cli", "stage", "--config", str(config)]
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        stack.callback(_stop, proc)
        target = _Target(f"http://127.0.0.1:{port}", token, proc, index, len(stages), n_embd)
        try:
            return asyncio.run(_drive(target, steps))
        except (ServedStepError, aiohttp.ClientError, asyncio.TimeoutError, FrameError) as exc:
            reason = (
                exc if isinstance(exc, ServedStepError) else f"could not drive the stage: {type(exc).__name__}: {exc}"
            )
            tail = (work / "stage.log").read_text(errors="replace").splitlines()[-5:]
            raise ServedStepError(f"{reason}; the stage's log ends: {' | '.join(tail) or '(empty)'}") from None


@dataclass(frozen=True)
class _Target:
    url: str  # the stage process's base URL
    token: str  # its cluster token
    proc: subprocess.Popen
    stage: int  # its stage index
    n_stages: int
    n_embd: int

    @property
    def last(self) -> bool:
        return self.stage == self.n_stages - 1


async def _drive(t: _Target, steps: int) -> ServedStep:
    """Stream ``steps`` timed one-row steps (after a warm-up) and time them."""
    # Replies from the stage (results, errors) and frames the stage passes on arrive on this queue.
    arrived: asyncio.Queue[tuple[str, aiohttp.WSMessage]] = asyncio.Queue()
    timeout = aiohttp.ClientTimeout(total=STEP_TIMEOUT_SECS)
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(
            aiohttp.ClientSession(headers={TOKEN_HEADER: t.token}, timeout=timeout)
        )
        await _wait_ready(session, t.url, t.proc)
        if not t.last:
            sink_url = await stack.enter_async_context(_next_stage_sink(arrived))
            async with session.post(
                t.url + PEERS_PATH, json={"coordinator": COORDINATOR_ID, "peers": {"0": sink_url}}
            ) as resp:
                if resp.status != 200:
                    raise ServedStepError(f"the stage refused its next-stage peer: HTTP {resp.status}")
        stream_headers = {ROLE_HEADER: "coordinator", COORD_HEADER: COORDINATOR_ID}
        ws = await stack.enter_async_context(
            session.ws_connect(t.url + STREAM_PATH, headers=stream_headers, max_msg_size=0)
        )
        reader = asyncio.get_running_loop().create_task(_forward_all(ws, "stage", arrived))
        stack.callback(reader.cancel)
        rng = np.random.default_rng(0)
        route = [[0] * t.n_stages]

        async def step(i: int, pos: int) -> None:
            rows = rng.standard_normal((1, t.n_embd), dtype=np.float32)
            wire = [step_to_wire(1, pos, 1, sample=t.last)]
            await ws.send_bytes(encode_chain(COORDINATOR_ID, i, t.stage, wire, route, [1], rows))
            source, msg = await asyncio.wait_for(arrived.get(), STEP_TIMEOUT_SECS)
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise ServedStepError(f"the {source} stream closed at step {i} ({msg.type.name})")
            if source == "next stage":
                header, _ = decode_frame(msg.data)
                if header.get("kind") != "chain" or header.get("step") != i or header.get("stage") != t.stage + 1:
                    raise ServedStepError(f"the stage passed on an unexpected frame at step {i}: {header}")
                return
            reply = decode_reply(msg.data)
            if not isinstance(reply, ChainResult):
                raise ServedStepError(f"the stage refused step {i}: {reply.code}: {reply.message}")
            if not t.last:
                raise ServedStepError(f"the stage replied to step {i} instead of passing it on")

        async def counters() -> tuple[float, float, float, float]:
            async with session.get(t.url + "/v1/info") as resp:
                info = await resp.json()
            return info["decode_seconds"] or 0.0, info["decode_count"], event_loop_cpu_s(t.proc.pid), cpu_s(t.proc.pid)

        for i in range(WARMUP_STEPS):
            await step(i + 1, i)
        before = await counters()
        for i in range(WARMUP_STEPS, WARMUP_STEPS + steps):
            await step(i + 1, i)
        after = await counters()
    forward_s, forwards, loop_s, process_s = (b - a for a, b in zip(before, after))
    if forwards != steps:
        raise ServedStepError(f"the stage made {forwards:.0f} forward calls for {steps} steps")
    return ServedStep(forward_s * 1e3 / steps, loop_s * 1e3 / steps, process_s * 1e3 / steps)


async def _forward_all(ws, source: str, arrived: asyncio.Queue) -> None:
    """Put every message of ``ws`` on ``arrived``, the closing one included."""
    while True:
        msg = await ws.receive()
        arrived.put_nowait((source, msg))
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            return


@contextlib.asynccontextmanager
async def _next_stage_sink(arrived: asyncio.Queue) -> AsyncIterator[str]:
    """A stand-in for the next stage on loopback: it accepts the stage's stream and puts each frame on ``arrived``;
    yields its base URL."""

    open_streams: set[web.WebSocketResponse] = set()

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        open_streams.add(ws)
        try:
            await _forward_all(ws, "next stage", arrived)
        finally:
            open_streams.discard(ws)
        return ws

    app = web.Application()
    app.router.add_get(STREAM_PATH, stream)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        for ws in list(open_streams):  # NOTE: before cleanup, which would wait for the open handlers
            await ws.close()
        await runner.cleanup()


async def _wait_ready(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServedStepError(f"the stage process exited with code {proc.returncode} while starting")
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECS)) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise ServedStepError(f"the stage process was not ready within {START_TIMEOUT_SECS:.0f} s")


def event_loop_cpu_s(pid: int) -> float:
    """CPU seconds so far of stage process ``pid``'s main thread: its event loop (the decode runs on other threads).
    Read from the scheduler's nanosecond count (``schedstat``): the tick-based thread times are 10 ms coarse."""
    return _schedstat_s(pathlib.Path(f"/proc/{pid}/task/{pid}/schedstat"))


def cpu_s(pid: int) -> float:
    """CPU seconds so far of all of process ``pid``'s threads (those alive now), from ``schedstat`` as above."""
    tasks = pathlib.Path(f"/proc/{pid}/task")
    try:
        names = [d.name for d in tasks.iterdir()]
    except OSError as exc:
        raise ServedStepError(f"cannot list the stage's threads in {tasks}: {exc}") from None
    total = 0.0
    for name in names:
        with contextlib.suppress(ServedStepError):  # a thread that ended since the listing
            total += _schedstat_s(tasks / name / "schedstat")
    return total


def _schedstat_s(path: pathlib.Path) -> float:
    try:
        return int(path.read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError) as exc:
        raise ServedStepError(f"cannot read the stage's CPU time from {path}: {exc}") from None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
