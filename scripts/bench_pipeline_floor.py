#!/usr/bin/env python3
"""The fastest a pipeline of stage processes can decode on this machine: the floor under benchmark 1 of issue 14.

Each stage of a converted model runs in its own process, pinned to its own core (unless ``--no-pin``) with the
given llama.cpp threads,
in one blocking loop: it reads a message from its link, runs the same ``StageRuntime.forward`` a served stage
runs, and writes its output to the next stage; the last stage sends the sampled token straight back to stage 0
(as ring steps do) and reports it to the driver. No event loop, no coordinator. Beside it, alternating in short
runs, the whole model decodes in one process pinned to one core with the same threads (the in-process side of
``bench_serve.py``).

- ``--link pipe|tcp|ws|aio``: pipes or loopback TCP in blocking loops, or event loops (uvloop) with aiohttp
  WebSockets (as served stages) or plain asyncio TCP with length-prefixed messages handled in the read callback;
- ``--frames raw|chain``: what crosses a link is the bare hidden states (or token), or the chain frame a served
  stage gets, decoded and checked as a served stage does (``decode_frame``, ``decode_chain``, ``StepGuard``) and
  encoded as it does for the next stage;
- ``--wait sleep|spin|idle-loop``: a stage sleeps in ``read``, polls its link for up to 50 ms, or sleeps while a
  busy loop at SCHED_IDLE keeps its core from idling;
- ``--no-pin``: every process on every core (the shared-cores setting); ``--stage-omp``: the stages' OpenMP
  waiting; ``--handoff on``: each forward call goes through the runtime's decode thread, as served stages with
  several llama.cpp threads do; ``--cores one``: every pinned stage on the in-process side's core (a core that
  does not idle between a token's halves) instead of each on its own.

Printed per pipeline: ms per token, the ratio to the in-process side, ms per link crossing, and each stage
process's CPU ms per token (user + system): wall time swings with the machine, CPU time shows the work.

What a pipe/raw pipeline loses against one process is the pipeline's own cost on this machine (two decode calls a
token, each stage's core idle while the other computes); what a served chain loses beyond tcp/chain is the event
loops', the batcher's and the coordinator's. ``bench_serve.py --floor pipe/raw,tcp/chain`` runs these beside the
served chain.

    .venv/bin/python scripts/bench_pipeline_floor.py
    .venv/bin/python scripts/bench_pipeline_floor.py --link pipe,tcp --frames raw,chain --reps 30 --tokens 64
    .venv/bin/python scripts/bench_pipeline_floor.py --model-dir ~/.cache/chatloop/llama1b-q4_0-2stage \\
        --gguf ~/.cache/chatloop/llama1b-q4_0-1stage/stage-0.gguf
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import pathlib
import select
import socket
import statistics
import struct
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib.idle_loop import idle_loop  # noqa: E402
from benchlib.omp import omp_env  # noqa: E402
from benchlib.options import comma_list  # noqa: E402
from benchlib.stats import cpu_seconds  # noqa: E402

from chatloop.demo import demo_gguf, demo_model_dir  # noqa: E402
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime  # noqa: E402
from chatloop.http_util import free_port  # noqa: E402
from chatloop.modelfiles.manifest import load_manifest  # noqa: E402
from chatloop.protocol.chain import decode_chain, encode_chain, encode_result  # noqa: E402
from chatloop.protocol.frames import decode_frame  # noqa: E402
from chatloop.protocol.messages import SeqStep  # noqa: E402
from chatloop.protocol.sampling import SamplingParams  # noqa: E402
from chatloop.stage.chain import StepGuard  # noqa: E402

WAITS = ("sleep", "spin", "idle-loop")
STEP = struct.Struct("<iii")  # sequence position, token (stage 0's input), tokens still to decode after this one
LENGTH = struct.Struct("<I")  # each message's length
LINKS = ("pipe", "tcp", "ws", "aio")
SPIN_SECS = 0.05  # --wait spin: how long a stage polls its link before it sleeps
REPORT_TIMEOUT_SECS = 300.0  # the driver gives up on a pipeline whose last stage reports nothing this long


def read_exactly(fd: int, n: int, spin: bool, timeout: float | None = None) -> bytes:
    """``n`` bytes from ``fd``; with ``spin`` the descriptor is non-blocking and polled for up to ``SPIN_SECS``
    before waiting in ``select`` (a stage between runs sleeps). ``timeout``: at most this long without a byte
    (TimeoutError)."""
    parts, got = [], 0
    deadline = time.monotonic() + SPIN_SECS
    while got < n:
        if timeout is not None and not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError(f"nothing came for {timeout:g} s")
        try:
            chunk = os.read(fd, n - got)
        except BlockingIOError:
            if time.monotonic() > deadline:
                select.select([fd], [], [])
            continue
        if not chunk:
            raise EOFError("the previous stage closed its link")
        parts.append(chunk)
        got += len(chunk)
        deadline = time.monotonic() + SPIN_SECS
    return b"".join(parts)


def send_message(fd: int, data: bytes) -> None:
    view = memoryview(LENGTH.pack(len(data)) + data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue


def read_message(fd: int, spin: bool, timeout: float | None = None) -> bytes:
    (n,) = LENGTH.unpack(read_exactly(fd, LENGTH.size, spin, timeout))
    return read_exactly(fd, n, spin, timeout)


class StageLoop:
    """One stage's work on each message: what a served stage does between receiving a step and passing it on."""

    def __init__(self, args: argparse.Namespace) -> None:
        manifest = load_manifest(args.model_dir)
        entry = manifest.stages[args.stage]
        self.n_stages = len(manifest.stages)
        self.role = StageRole(first=entry.has_embedding, last=entry.has_head)
        options = RuntimeOptions(n_threads=args.threads, kv_cache_mb=256)
        self.rt = StageRuntime(args.model_dir / entry.file, self.role, options)
        self.frames = args.frames
        self.handoff = args.handoff
        self.greedy = SamplingParams(temperature=0.0)
        self.guard = StepGuard()

    def handle(self, message: bytes) -> tuple[bytes | None, bytes | None]:
        """(what goes to the next stage, what goes to the driver as a report), either None; raises StopIteration
        at the driver's stop message."""
        role, rt = self.role, self.rt
        pos, token, left = STEP.unpack_from(message)
        if pos < 0:
            raise StopIteration
        if pos == 0:
            rt.release(1)  # a new run
            self.guard = StepGuard()
        frame = None
        if self.frames:
            header, tensor = decode_frame(message[STEP.size :])
            frame = decode_chain(header, tensor, first=role.first, n_embd=rt.n_embd, n_stages=self.n_stages,
                                 max_steps=64)  # fmt: skip
            if self.guard.check(frame.steps, frame.epochs, frame.step) is not None:
                raise RuntimeError("a duplicate step")
            self.guard.take(frame.steps, frame.epochs, frame.step)
            steps, data = frame.steps, frame.data
        else:
            sampling = self.greedy if role.last and pos == 0 else None
            steps = [SeqStep(1, pos, 1, sample=role.last, sampling=sampling)]
            if role.first:
                data = np.asarray([token], np.int32)
            else:
                data = np.frombuffer(message, np.float32, offset=STEP.size).reshape(1, -1)
        # --handoff: through the runtime's decode thread and back, as a served stage with several threads does
        out = rt.run(rt.forward, steps, data) if self.handoff else rt.forward(steps, data)
        if not role.last:
            if frame is not None:
                payload = encode_chain(frame.coord, frame.step, frame.stage + 1, frame.raw_steps, frame.routes,
                                       frame.epochs, out)  # fmt: skip
            else:
                payload = np.ascontiguousarray(out, np.float32).tobytes()
            return message[: STEP.size] + payload, None
        new_token = out[0].token
        reply = STEP.pack(pos + 1, new_token, left - 1)
        ring = result = b""
        if frame is not None:
            raw = [{"seq": 1, "pos": pos + 1, "n": 1, "sample": True}]
            ring = encode_chain(frame.coord, frame.step + 1, 0, raw, frame.routes, frame.epochs,
                                np.array([new_token], np.int32))  # fmt: skip
            result = encode_result(frame.step, [1], out)
        # straight on to stage 0 (as ring steps do) while tokens are left
        return (reply + ring if left > 0 else None), reply + result


def run_stage(args: argparse.Namespace) -> int:
    """A child: one stage of the ring, reading steps from ``--in-fd`` and writing to ``--out-fd`` (or, with
    ``--listen-port``, over WebSockets); the last stage also reports each sampled token to the driver on
    ``--report-fd``. Every message is a ``STEP`` and, with ``--frames``, the chain frame a served stage would get
    (decoded and checked as a served stage does), else the raw hidden states (pipes and TCP: length-prefixed)."""
    if args.core >= 0:
        os.sched_setaffinity(0, {args.core})
    stage = StageLoop(args)
    try:
        if args.listen_port:
            from chatloop import event_loop  # noqa: PLC0415

            return event_loop.run(run_stage_async(args, stage))
        spin = args.wait == "spin"
        os.set_blocking(args.in_fd, not spin)
        while True:
            message = read_message(args.in_fd, spin)
            try:
                onward, report = stage.handle(message)
            except StopIteration:
                if not stage.role.last:
                    send_message(args.out_fd, message)
                return 0
            if onward is not None:
                send_message(args.out_fd, onward)
            if report is not None:
                send_message(args.report_fd, report)
    finally:
        stage.rt.close()


class FramedStream(asyncio.Protocol):
    """--link aio: length-prefixed messages over a plain asyncio TCP connection; each whole message goes to
    ``on_message`` from the read callback itself (no reader task, no queue)."""

    def __init__(self, on_message=None) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= LENGTH.size:
            (n,) = LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < LENGTH.size + n:
                return
            message = bytes(self.buffer[LENGTH.size : LENGTH.size + n])
            del self.buffer[: LENGTH.size + n]
            if self.on_message is not None:
                self.on_message(message)

    def send(self, message: bytes) -> None:
        self.transport.write(LENGTH.pack(len(message)) + message)


async def run_stage_async(args: argparse.Namespace, stage: StageLoop) -> int:
    """The stage on an event loop, as served stages run. ``ws``: an aiohttp server takes WebSocket messages from
    the previous stage and an aiohttp client WebSocket passes them on; ``aio``: plain asyncio TCP connections
    with length-prefixed messages, handled in the read callback. Stage 0 also takes the driver's messages on a
    pipe."""
    import aiohttp  # noqa: PLC0415
    from aiohttp import web  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    session = aiohttp.ClientSession()
    out_ws = None
    out_stream: FramedStream | None = None
    url = f"http://127.0.0.1:{args.next_port}/ws"

    async def connect_next() -> None:
        nonlocal out_ws, out_stream
        deadline = loop.time() + 120
        while out_ws is None and out_stream is None:  # NOTE: the next stage may still be loading its weights
            try:
                if args.link == "ws":
                    out_ws = await session.ws_connect(url, max_msg_size=0)
                else:
                    _, out_stream = await loop.create_connection(FramedStream, "127.0.0.1", args.next_port)
            except (aiohttp.ClientConnectorError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.1)

    def step_now(message: bytes) -> bytes | None:
        """Handle a message; what goes on (sent here already when the link is aio and connected)."""
        try:
            onward, report = stage.handle(message)
        except StopIteration:
            onward, report = (None if stage.role.last else message), None
            if not done.done():
                done.set_result(0)
        if report is not None:
            send_message(args.report_fd, report)
        if onward is not None and out_stream is not None:
            out_stream.send(onward)
            return None
        return onward

    async def step(message: bytes) -> None:
        onward = step_now(message)
        if onward is None:
            return
        await connect_next()
        if out_ws is not None:
            await out_ws.send_bytes(onward)
        else:
            out_stream.send(onward)

    def on_message(message: bytes) -> None:  # aio: handled in the read callback once the next link is open
        if out_stream is not None:
            step_now(message)
        else:
            loop.create_task(step(message))

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await step(msg.data)
        return ws

    runner = server = None
    if args.link == "ws":
        app = web.Application()
        app.router.add_get("/ws", stream)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.listen_port).start()
    else:
        server = await loop.create_server(lambda: FramedStream(on_message), "127.0.0.1", args.listen_port)
    if args.in_fd >= 0:  # the driver's messages (stage 0)
        os.set_blocking(args.in_fd, False)
        buffer = bytearray()

        def readable() -> None:
            try:
                buffer.extend(os.read(args.in_fd, 1 << 16))
            except BlockingIOError:
                return
            while len(buffer) >= LENGTH.size and len(buffer) >= LENGTH.size + LENGTH.unpack_from(buffer)[0]:
                n = LENGTH.unpack_from(buffer)[0]
                message = bytes(buffer[LENGTH.size : LENGTH.size + n])
                del buffer[: LENGTH.size + n]
                loop.create_task(step(message))

        loop.add_reader(args.in_fd, readable)
    try:
        return await done
    finally:
        if out_ws is not None:
            await out_ws.close()
        if out_stream is not None:
            out_stream.transport.close()
        await session.close()
        if runner is not None:
            await runner.cleanup()
        if server is not None:
            server.close()


def first_message(frames: bool, n_stages: int, max_tokens: int) -> bytes:
    """The driver's message that starts a run at stage 0: token 1 at position 0."""
    step = STEP.pack(0, 1, max_tokens)
    if not frames:
        return step
    raw = [{"seq": 1, "pos": 0, "n": 1, "sample": True, "sampling": {"temperature": 0.0}}]
    return step + encode_chain("floor", 1, 0, raw, [[0] * n_stages], [1], np.array([1], np.int32))


def connected_pair(link: str) -> tuple[int, int]:
    """(read end, write end) of one link: a pipe, or a TCP connection over loopback."""
    if link == "pipe":
        return os.pipe()
    with socket.create_server(("127.0.0.1", 0)) as server:
        writer = socket.create_connection(server.getsockname())
        reader, _ = server.accept()
    for sock in (reader, writer):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader.detach(), writer.detach()


class Pipeline:
    """The stage processes joined in a ring (``link``); the driver starts a run at stage 0 over a pipe and reads
    the last stage's reports from another."""

    def __init__(
        self,
        model_dir: pathlib.Path,
        threads: int,
        wait: str,
        link: str = "pipe",
        frames: bool = False,
        pin: bool = True,
        env: dict[str, str | None] | None = None,
        handoff: bool = False,
        one_core: bool = False,
    ) -> None:
        """``env``: variables to set (None: to remove) in the stages' environment, e.g. their OpenMP waiting;
        ``one_core``: every stage pinned to the lowest core this process may use (where the in-process side runs)
        instead of each to its own."""
        child_env = {k: v for k, v in (dict(os.environ) | (env or {})).items() if v is not None}
        n = self.n_stages = len(load_manifest(model_dir).stages)
        self.frames = frames
        self.cpu_ms: list[float] = []  # each stage's CPU ms per token in the latest run
        # ring[k] feeds stage k; over WebSockets only the driver's pipe into stage 0 is a pipe
        ring = [connected_pair("pipe" if link in ("ws", "aio") else link) for _ in range(n)]
        ports = [free_port() for _ in range(n)] if link in ("ws", "aio") else []
        report_r, report_w = os.pipe()
        self.procs = []
        first_core = min(os.sched_getaffinity(0))
        for k in range(n):
            if link in ("ws", "aio"):
                fds = ([ring[0][0]] if k == 0 else []) + ([report_w] if k == n - 1 else [])
                where = ["--in-fd", str(ring[0][0]) if k == 0 else "-1", "--listen-port", str(ports[k]),
                         "--next-port", str(ports[(k + 1) % n]), "--link", link]  # fmt: skip
            else:
                fds = [ring[k][0], ring[(k + 1) % n][1]] + ([report_w] if k == n - 1 else [])
                where = ["--in-fd", str(fds[0]), "--out-fd", str(fds[1])]
            cmd = [sys.executable, __file__, "--stage", str(k), "--model-dir", str(model_dir), "--threads",
                   str(threads), "--core", str((first_core if one_core else k % os.cpu_count()) if pin else -1), "--wait", wait, *where,
                   "--report-fd", str(report_w)] + (["--frames", "chain"] if frames else []) + (["--handoff", "on"] if handoff else [])  # fmt: skip
            self.procs.append(subprocess.Popen(cmd, pass_fds=fds, env=child_env))
        # --wait idle-loop: a busy loop at SCHED_IDLE on each stage's core, which runs only while the stage waits
        self.loops = [idle_loop(k % os.cpu_count()) for k in range(n)] if wait == "idle-loop" else []
        self.to_first, self.reports = os.dup(ring[0][1]), report_r
        for r, w in ring:
            os.close(r)
            os.close(w)
        os.close(report_w)

    def generate(self, max_tokens: int) -> list[float]:
        """Greedy tokens after a one-token prompt: the time between consecutive reports of the last stage. Each
        stage's CPU ms per token of the run is left in ``cpu_ms``."""
        cpu0 = [cpu_seconds([p.pid]) for p in self.procs]
        send_message(self.to_first, first_message(self.frames, self.n_stages, max_tokens))
        stamps = []
        for _ in range(max_tokens + 1):
            try:
                read_message(self.reports, False, REPORT_TIMEOUT_SECS)
            except (TimeoutError, EOFError) as exc:
                codes = ", ".join(f"stage {k}: {p.poll()}" for k, p in enumerate(self.procs))
                raise RuntimeError(
                    f"the pipeline stopped reporting ({exc}); exit codes (None = running): {codes}"
                ) from None
            stamps.append(time.perf_counter())
        self.cpu_ms = [1000 * (cpu_seconds([p.pid]) - c) / (max_tokens + 1) for p, c in zip(self.procs, cpu0)]
        return [b - a for a, b in zip(stamps, stamps[1:])]

    def close(self) -> None:
        try:
            send_message(self.to_first, STEP.pack(-1, 0, 0))
        except OSError:
            pass
        for loop in self.loops:
            loop.kill()
            loop.wait()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        os.close(self.to_first)
        os.close(self.reports)


def in_process_times(rt: StageRuntime, first_token: int, max_tokens: int) -> list[float]:
    greedy = SamplingParams(temperature=0.0)
    rt.release(1)
    out = rt.forward([SeqStep(1, 0, 1, sample=True, sampling=greedy)], np.asarray([first_token], np.int32))
    token, times = out[0].token, []
    for pos in range(1, max_tokens + 1):
        start = time.perf_counter()
        out = rt.forward([SeqStep(1, pos, 1, sample=True)], np.asarray([token], np.int32))
        token = out[0].token
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=pathlib.Path, help="a converted model (default: the demo in 2 stages)")
    p.add_argument("--gguf", type=pathlib.Path, help="the whole GGUF for the in-process side (default: the demo's)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads per stage and in-process (default 1)")
    p.add_argument("--wait", default="sleep",
                   help="how a stage waits for its input: sleep, spin (poll the link) or idle-loop (sleep beside a "
                        "SCHED_IDLE busy loop on its core), or several (sleep)")  # fmt: skip
    p.add_argument(
        "--link",
        default="pipe",
        help="the links between stages: pipe, tcp (blocking loops), ws (event loops and aiohttp WebSockets, "
        "as served stages), aio (event loops, plain asyncio TCP, length-prefixed messages) or several (pipe)",
    )
    p.add_argument("--frames", default="raw",
                   help="what crosses a link: raw (hidden states), chain (served chain frames, decoded and checked "
                        "as a served stage does) or raw,chain (raw)")  # fmt: skip
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per run (default 32)")
    p.add_argument("--no-pin", action="store_true",
                   help="leave every process on every core (the shared-cores setting, e.g. 2 threads a stage on 2 "
                        "cores); default: stage K pinned to core K and the in-process side to one core")  # fmt: skip
    p.add_argument("--cores", default="own",
                   help="where pinned stages run: own (stage K on core K) or one (every stage on the in-process "
                        "side's core: a core that never idles between a token's halves), or own,one (own)")  # fmt: skip
    p.add_argument("--stage-omp", default="",
                   help="the stages' OpenMP waiting, each value a pipeline of its own: default, passive or spin<N> "
                        "(default: as this process's environment says)")  # fmt: skip
    p.add_argument("--handoff", default="off",
                   help="each stage hands its forward call to the runtime's decode thread and waits for it, as a "
                        "served stage with several llama.cpp threads does: off, on or off,on (default off)")  # fmt: skip
    p.add_argument("--reps", type=int, default=30, help="alternating runs of each side (default 30)")
    # The stage children's own arguments.
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    p.add_argument("--core", type=int, help=argparse.SUPPRESS)
    p.add_argument("--in-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--listen-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--next-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage is not None:
        args.frames = args.frames == "chain"
        args.handoff = args.handoff == "on"
    args.model_dir = args.model_dir or demo_model_dir(2)
    if args.stage is not None:
        return run_stage(args)
    waits = comma_list(p, "--wait", args.wait, WAITS)
    links = comma_list(p, "--link", args.link, LINKS)
    formats = comma_list(p, "--frames", args.frames, ("raw", "chain"))
    handoffs = comma_list(p, "--handoff", args.handoff, ("off", "on"))
    placements = comma_list(p, "--cores", args.cores, ("own", "one"))
    if args.no_pin and placements != ["own"]:
        p.error("--cores one places pinned stages; it cannot go with --no-pin")
    omps = [x.strip() for x in args.stage_omp.split(",") if x.strip()] or [""]
    for o in filter(None, omps):
        try:
            omp_env(o)
        except ValueError as exc:
            p.error(f"--stage-omp: {exc}")
    gguf = args.gguf or demo_gguf()
    n_stages = len(load_manifest(args.model_dir).stages)
    whole = StageRuntime(gguf, StageRole(True, True), RuntimeOptions(n_threads=args.threads, kv_cache_mb=256))
    pipelines = {}
    for w, link, fmt, o, h, c in itertools.product(waits, links, formats, omps, handoffs, placements):
        label = f"{link}, {fmt}, {w}" + (f", omp {o}" if o else "") + (", handoff" if h == "on" else "")
        pipelines[label + (", one core" if c == "one" else "")] = Pipeline(
            args.model_dir,
            args.threads,
            w,
            link,
            fmt == "chain",
            not args.no_pin,
            omp_env(o) if o else None,
            handoff=h == "on",
            one_core=c == "one",
        )
    results: dict[str, list[float]] = {"in-process": [], **{name: [] for name in pipelines}}
    cpu: dict[str, list[list[float]]] = {name: [] for name in results}  # per run: CPU ms per token of each process
    all_cores = os.sched_getaffinity(0)
    try:
        for pipeline in pipelines.values():
            pipeline.generate(4)  # loaded and warm
        for _ in range(args.reps):
            if not args.no_pin:
                os.sched_setaffinity(0, {min(all_cores)})  # like-for-like: one core, as each stage has
            cpu0 = time.process_time()
            results["in-process"].append(statistics.median(in_process_times(whole, 1, args.tokens)))
            cpu["in-process"].append([1000 * (time.process_time() - cpu0) / (args.tokens + 1)])
            os.sched_setaffinity(0, all_cores)
            for name, pipeline in pipelines.items():
                results[name].append(statistics.median(pipeline.generate(args.tokens)))
                cpu[name].append(pipeline.cpu_ms)
    finally:
        whole.close()
        for pipeline in pipelines.values():
            pipeline.close()
    base = statistics.median(results["in-process"])
    print(f"{gguf.name}: {n_stages} stage processes in a ring vs one process, {args.threads} thread(s), "
          f"median over {args.reps} alternating runs of {args.tokens} tokens")  # fmt: skip
    print(f"{'':24} {'ms/token':>9} {'x in-process':>13} {'ms per crossing':>16} {'paired ratio':>13}  CPU ms/token")
    for name, values in results.items():
        med = statistics.median(values)
        cpu_ms = " + ".join(f"{statistics.median(col):.2f}" for col in zip(*cpu[name]))
        if name == "in-process":
            print(f"{name:24} {med * 1e3:9.2f} {1:13.3f} {'':16} {'':13}  {cpu_ms}")
            continue
        paired = statistics.median(b / v for b, v in zip(results["in-process"], values))
        print(f"{name:24} {med * 1e3:9.2f} {base / med:13.3f} {(med - base) * 1e3 / n_stages:16.3f} {paired:13.3f}"
              f"  {cpu_ms}")  # fmt: skip
    print(
        f"(crossings per token: {n_stages}, stage to stage and the last stage back to stage 0; paired ratio: "
        "the median over runs of in-process / pipeline ms, each pair run back to back; CPU ms/token: each stage "
        "process's, medians over runs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
