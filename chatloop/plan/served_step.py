"""What a served step costs a stage process beyond its decode, for ``chatloop bench-host``.

A stage's step is more than its ``llama_decode``: its event loop reads the frame from the stream, checks it, hands
the rows to the decode thread and sends the result on, and on a stage's own cores all of that runs in turn with
the decodes (about 1 ms a step on the development machine, against 10-20 ms decodes of the demo model: enough to
put a plan's prediction 20-30 % under what is served). So bench-host starts a real stage process on its last-stage
timing file (loopback, a fresh cluster token, this process's cores and quota), streams one-row steps to it as a
coordinator does, one at a time, and reads the CPU time per step of the process's main thread, which runs its event
loop (the decode runs on its own threads).
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

import aiohttp
import numpy as np
import yaml

from chatloop.http_util import free_port
from chatloop.modelfiles.gguf_info import read_gguf_info
from chatloop.modelfiles.manifest import load_manifest
from chatloop.protocol.chain import ChainResult, decode_reply, encode_chain
from chatloop.protocol.frames import FrameError
from chatloop.protocol.messages import step_to_wire
from chatloop.protocol.streams import COORD_HEADER, ROLE_HEADER, STREAM_PATH, TOKEN_HEADER

log = logging.getLogger(__name__)

START_TIMEOUT_SECS = 120.0  # the stage process loads its file and answers /readyz
STEP_TIMEOUT_SECS = 60.0  # one step's reply
PROBE_TIMEOUT_SECS = 2.0  # one readiness probe while it starts
WARMUP_STEPS = 3  # steps before timing (first decodes page the weights in)
COORDINATOR_ID = "bench-host"


class ServedStepError(RuntimeError):
    """The stage process could not be started or driven; the message says which and why."""


def served_overhead_ms(stage_file: pathlib.Path, threads: int, steps: int) -> float:
    """Milliseconds of CPU a stage process's event loop spends per served one-row step.

    ``stage_file``: the last stage of a converted folder (it samples and replies to the coordinator: no next stage
    needed) that takes hidden states (not the only stage)."""
    stages = load_manifest(stage_file.parent).stages
    if len(stages) < 2 or stages[-1].file != stage_file.name:
        raise ServedStepError(f"{stage_file}: not the last stage of a converted model of two or more stages")
    n_stages, n_embd = len(stages), read_gguf_info(stage_file).n_embd
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
        url = f"http://127.0.0.1:{port}"
        try:
            return asyncio.run(_drive(url, token, proc, n_stages, n_embd, steps))
        except (ServedStepError, aiohttp.ClientError, asyncio.TimeoutError, FrameError) as exc:
            reason = (
                exc if isinstance(exc, ServedStepError) else f"could not drive the stage: {type(exc).__name__}: {exc}"
            )
            tail = (work / "stage.log").read_text(errors="replace").splitlines()[-5:]
            raise ServedStepError(f"{reason}; the stage's log ends: {' | '.join(tail) or '(empty)'}") from None


async def _drive(url: str, token: str, proc: subprocess.Popen, n_stages: int, n_embd: int, steps: int) -> float:
    headers = {TOKEN_HEADER: token}
    timeout = aiohttp.ClientTimeout(total=STEP_TIMEOUT_SECS)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        await _wait_ready(session, url, proc)
        stream_headers = {ROLE_HEADER: "coordinator", COORD_HEADER: COORDINATOR_ID}
        async with session.ws_connect(url + STREAM_PATH, headers=stream_headers, max_msg_size=0) as ws:
            rng = np.random.default_rng(0)
            stage, route = n_stages - 1, [[0] * n_stages]

            async def step(i: int, pos: int) -> None:
                rows = rng.standard_normal((1, n_embd), dtype=np.float32)
                wire = [step_to_wire(1, pos, 1, sample=True)]
                await ws.send_bytes(encode_chain(COORDINATOR_ID, i, stage, wire, route, [1], rows))
                msg = await asyncio.wait_for(ws.receive(), STEP_TIMEOUT_SECS)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    raise ServedStepError(f"the stage closed its stream at step {i} ({msg.type.name})")
                reply = decode_reply(msg.data)
                if not isinstance(reply, ChainResult):
                    raise ServedStepError(f"the stage refused step {i}: {reply.code}: {reply.message}")

            for i in range(WARMUP_STEPS):
                await step(i + 1, i)
            before = event_loop_cpu_s(proc.pid)
            for i in range(WARMUP_STEPS, WARMUP_STEPS + steps):
                await step(i + 1, i)
            after = event_loop_cpu_s(proc.pid)
    return (after - before) * 1e3 / steps


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
    path = pathlib.Path(f"/proc/{pid}/task/{pid}/schedstat")
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
