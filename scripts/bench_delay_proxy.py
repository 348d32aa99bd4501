"""Check scripts/delay_proxy.py against its settings: added round trip, streaming, bandwidth.

    .venv/bin/python scripts/bench_delay_proxy.py [--delays 1,5,20] [--mbit 100]

An echo server on loopback, reached directly and through a proxy per delay, in the same run:

- **RTT**: median round trip of a 64-byte message; the added RTT should be 2 x the one-way delay.
- **stream**: 50 messages written 2 ms apart; the last echo should come back ~2 x delay after it was sent,
  not 50 x delay (the delay is a per-chunk deadline, not a sleep per chunk).
- **bandwidth** (with --mbit): one-way transfer of 8 MB through a capped proxy vs the cap.
Runs in a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from delay_proxy import DelayProxy, precise_loop  # noqa: E402


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while data := await reader.read(1 << 20):
        total += len(data)
    writer.write(str(total).encode())
    await writer.drain()
    writer.close()


async def rtt_ms(port: int, reps: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    msg = b"x" * 64
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        writer.write(msg)
        await reader.readexactly(len(msg))
        samples.append((time.perf_counter() - t0) * 1000)
    writer.close()
    return statistics.median(samples)


async def stream_last_echo_ms(port: int, n: int = 50, gap_ms: float = 2.0) -> float:
    """Write n messages gap_ms apart; time from the last write to its echo."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    msg = b"y" * 32
    for i in range(n):
        if i:
            await asyncio.sleep(gap_ms / 1000)
        writer.write(msg)
        await writer.drain()
    t_last = time.perf_counter()
    await reader.readexactly(len(msg) * n)
    writer.close()
    return (time.perf_counter() - t_last) * 1000


async def transfer_mbit(port: int, nbytes: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    block = b"z" * 65536
    for _ in range(nbytes // len(block)):
        writer.write(block)
        await writer.drain()
    writer.write_eof()
    await reader.read()
    writer.close()
    return nbytes * 8 / 1e6 / (time.perf_counter() - t0)


async def main(args: argparse.Namespace) -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = echo.sockets[0].getsockname()[1]
    base = await rtt_ms(port, args.reps)
    print(f"direct: RTT {base:.2f} ms")
    print(f"{'delay ms':>9} {'RTT ms':>8} {'added':>7} {'expected':>9} {'stream last-echo ms':>20}")
    for delay in args.delays:
        async with DelayProxy(0, ("127.0.0.1", port), delay) as proxy:
            rtt = await rtt_ms(proxy.port, args.reps)
            last = await stream_last_echo_ms(proxy.port)
        print(f"{delay:9.1f} {rtt:8.2f} {rtt - base:7.2f} {2 * delay:9.1f} {last:20.2f}")
    if args.mbit:
        sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
        async with DelayProxy(0, ("127.0.0.1", sink.sockets[0].getsockname()[1]), 1.0, mbit=args.mbit) as proxy:
            got = await transfer_mbit(proxy.port, 8 * 1024 * 1024)
        print(f"bandwidth cap {args.mbit} Mbit/s: measured {got:.1f} Mbit/s (8 MiB, one way)")
        sink.close()
    echo.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delays", default="1,5,20", help="one-way delays in ms, comma-separated")
    p.add_argument("--reps", type=int, default=50, help="round trips per measurement")
    p.add_argument("--mbit", type=float, default=100.0, help="bandwidth cap to check (0 = skip)")
    a = p.parse_args()
    a.delays = [float(d) for d in a.delays.split(",") if d]
    loop = precise_loop()  # as the proxy's CLI runs
    try:
        loop.run_until_complete(main(a))
    finally:
        loop.close()
