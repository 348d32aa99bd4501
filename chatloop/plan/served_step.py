"""What a served step costs a stage process beyond its decode, for ``chatloop bench-host``.

A stage's step is more than its ``llama_decode``: its event loop reads the frame from the stream, checks it, hands
the rows to the decode thread and sends the result on, and on a stage's own cores all of that runs in turn with
the decodes (about 1 ms a step on the development machine, against 10-20 ms decodes of the demo model: enough to
put a plan's prediction 20-30 % under what is served). So bench-host starts a real stage process on a timing
file (loopback, a fresh cluster token, this process's cores and quota), streams one-row steps to it as a coordinator
of two micro-batches does (two sequences, each one's next step sent when its last one came back: the stage is kept
busy, and the next frame arrives while it decodes, as at the bottleneck a plan prices), and reads per step: the
forward call's wall time as the stage reports it (the hand-off to the decode thread and back included, and with it
the wake-ups a core shared with other work delays) and the CPU time of the process's main thread, which runs its
event loop (the decode runs on its own threads). A step keeps the stage busy for both: ``ServedStep.busy_ms``.

The two roles cost differently and are timed apart: a last stage samples and replies to the coordinator; a first or
middle stage passes its hidden states on to the next stage's stream (here a sink in this process, registered with
the stage as its peer, that takes each frame as the step's completion).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
WARMUP_STEPS = 3  # steps of each sequence before timing (first decodes page the weights in)
IN_FLIGHT = 2  # sequences with a step out at once: the stage always has the next frame waiting
SLOTS = 4  # the stage's sequence slots: room to place the second sequence apart from the first
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
                    "max_sequences": SLOTS,
                    # NOTE: every decode on the decode thread, so that the main thread's CPU stays the event loop's
                    # work: a served stage with one thread decodes small steps on its event loop's thread, which
                    # saves it the hand-off (~0.1 ms a step); the figure is that much on the safe side there.
                    "batching": {"batching_window_ms": 0, "inline_max_rows": 0},
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
    """Time ``steps`` one-row steps (after a warm-up), two sequences' steps in flight at once."""
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
        steps_in_flight = _StepsInFlight(t, ws, arrived)

        async def counters() -> tuple[float, float, float, float]:
            async with session.get(t.url + "/v1/info") as resp:
                info = await resp.json()
            return info["decode_seconds"] or 0.0, info["decode_count"], event_loop_cpu_s(t.proc.pid), cpu_s(t.proc.pid)

        await steps_in_flight.start()
        await steps_in_flight.run(WARMUP_STEPS * IN_FLIGHT)
        before = await counters()
        await steps_in_flight.run(steps)
        after = await counters()
    forward_s, forwards, loop_s, process_s = (b - a for a, b in zip(before, after))
    if forwards != steps:
        raise ServedStepError(f"the stage made {forwards:.0f} forward calls for {steps} one-row steps")
    return ServedStep(forward_s * 1e3 / steps, loop_s * 1e3 / steps, process_s * 1e3 / steps)


class _StepsInFlight:
    """Steps streamed to the stage as a coordinator of ``IN_FLIGHT`` micro-batches would: each sequence's next step
    goes out when its last one came back, so the stage is never idle and the next frame arrives (and is read and
    checked by its event loop) while it decodes, as when a plan's pipeline runs full."""

    def __init__(self, t: _Target, ws, arrived: asyncio.Queue) -> None:
        self.t, self.ws, self.arrived = t, ws, arrived
        self.rng = np.random.default_rng(0)
        self.route = [[0] * t.n_stages]
        self.step_ids = itertools.count(1)
        self.pos = dict.fromkeys(range(1, IN_FLIGHT + 1), 0)  # sequence -> its next position

    async def start(self) -> None:
        """Each sequence's first step alone: the stage then gives the second sequence a slot apart from the first's,
        as it does a coordinator's second micro-batch (engine/slots.py ``pick_slot``), and never merges their steps
        into one decode (``SLOTS``)."""
        for seq in self.pos:
            expected = {await self._send(seq)}
            await self._back(expected)

    async def run(self, steps: int) -> None:
        """``steps`` steps, the sequences' in turn; returns when every one came back."""
        sent: dict[int, int] = {}  # step id -> sequence
        for seq in list(self.pos)[:steps]:
            sent[await self._send(seq)] = seq
        done = 0
        while sent:
            seq = sent.pop(await self._back(set(sent)))
            done += 1
            if done + len(sent) < steps:
                sent[await self._send(seq)] = seq

    async def _send(self, seq: int) -> int:
        i, t = next(self.step_ids), self.t
        rows = self.rng.standard_normal((1, t.n_embd), dtype=np.float32)
        wire = [step_to_wire(seq, self.pos[seq], 1, sample=t.last)]
        await self.ws.send_bytes(encode_chain(COORDINATOR_ID, i, t.stage, wire, self.route, [1], rows))
        self.pos[seq] += 1
        return i

    async def _back(self, expected: set[int]) -> int:
        """The id of the next step that came back (passed on, or answered by the last stage)."""
        source, msg = await asyncio.wait_for(self.arrived.get(), STEP_TIMEOUT_SECS)
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise ServedStepError(f"the {source} stream closed with steps {sorted(expected)} out ({msg.type.name})")
        if source == "next stage":
            header, _ = decode_frame(msg.data)
            i = header.get("step")
            if header.get("kind") != "chain" or i not in expected or header.get("stage") != self.t.stage + 1:
                raise ServedStepError(
                    f"the stage passed on an unexpected frame (steps {sorted(expected)} out): {header}"
                )
            return i
        reply = decode_reply(msg.data)
        if not isinstance(reply, ChainResult):
            raise ServedStepError(f"the stage refused step {reply.step}: {reply.code}: {reply.message}")
        if not self.t.last:
            raise ServedStepError(f"the stage replied to step {reply.step} instead of passing it on")
        if reply.step not in expected:
            raise ServedStepError(f"the stage answered step {reply.step}, which is not out (steps {sorted(expected)})")
        return reply.step


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
