"""Round trip of one step-sized frame over each candidate transport of the chain data plane (issue 14).

Three servers in this process on loopback echo a binary frame back (a forward frame of one decode row of
SmolLM2: a JSON header and 576 float32 = 2.3 kB); one client sends, waits for the echo, and repeats:

- HTTP: ``POST`` on a keep-alive aiohttp session (what the star does per stage and step),
- WebSocket: one binary message each way on a persistent aiohttp WebSocket,
- TCP: asyncio streams with a 4-byte length prefix per frame.

The transports alternate (``--reps`` rounds of ``--n`` round trips each) so that machine noise falls on all of
them; medians of the rounds are printed. Client and server share one event loop here, so each figure includes
both ends' Python work, as a hop between two processes would.

    .venv/bin/python scripts/bench_transport.py --n 2000 --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import time

import aiohttp
import numpy as np
from aiohttp import web

from chatloop.protocol.frames import encode_frame

_LEN = struct.Struct("<I")


async def _http_echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/octet-stream")


async def _ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=64 << 20)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (n,) = _LEN.unpack(await reader.readexactly(4))
            writer.write(_LEN.pack(n) + await reader.readexactly(n))
    except asyncio.IncompleteReadError:
        writer.close()


async def _round_trips(kind: str, n: int, frame: bytes, port: int, tcp_port: int, session) -> float:
    """Mean ms per round trip of ``n`` frames."""
    if kind == "http":
        start = time.perf_counter()
        for _ in range(n):
            async with session.post(f"http://127.0.0.1:{port}/echo", data=frame) as resp:
                await resp.read()
        return 1000 * (time.perf_counter() - start) / n
    if kind == "websocket":
        async with session.ws_connect(f"http://127.0.0.1:{port}/ws", max_msg_size=64 << 20) as ws:
            start = time.perf_counter()
            for _ in range(n):
                await ws.send_bytes(frame)
                await ws.receive()
            return 1000 * (time.perf_counter() - start) / n
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
    try:
        start = time.perf_counter()
        for _ in range(n):
            writer.write(_LEN.pack(len(frame)) + frame)
            (m,) = _LEN.unpack(await reader.readexactly(4))
            await reader.readexactly(m)
        return 1000 * (time.perf_counter() - start) / n
    finally:
        writer.close()


async def run(n: int, reps: int, n_embd: int) -> dict[str, list[float]]:
    header = {"kind": "chain", "step": 1, "steps": [{"seq": 123456789, "pos": 100, "n": 1}], "route": [[0]]}
    frame = encode_frame(header, np.zeros((1, n_embd), dtype=np.float32))
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/echo", _http_echo)
    app.router.add_get("/ws", _ws_echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the port picked by the OS
    tcp = await asyncio.start_server(_tcp_echo, "127.0.0.1", 0)
    tcp_port = tcp.sockets[0].getsockname()[1]
    results: dict[str, list[float]] = {"http": [], "websocket": [], "tcp": []}
    try:
        async with aiohttp.ClientSession() as session:
            for kind in results:  # warm-up
                await _round_trips(kind, 50, frame, port, tcp_port, session)
            for _ in range(reps):
                for kind in results:
                    results[kind].append(await _round_trips(kind, n, frame, port, tcp_port, session))
    finally:
        tcp.close()
        await runner.cleanup()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="round trips per transport and round (default 2000)")
    p.add_argument("--reps", type=int, default=5, help="alternating rounds; medians reported (default 5)")
    p.add_argument("--n-embd", type=int, default=576, help="hidden row width of the frame (default 576, SmolLM2)")
    args = p.parse_args(argv)
    results = asyncio.run(run(args.n, args.reps, args.n_embd))
    http = statistics.median(results["http"])
    print(f"round trip of a {args.n_embd}-float frame, median of {args.reps} rounds of {args.n}:")
    for kind, rounds in results.items():
        med = statistics.median(rounds)
        print(f"  {kind:<10} {med:7.3f} ms   ({med / http:.2f} x HTTP)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
