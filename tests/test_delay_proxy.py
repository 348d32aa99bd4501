"""The delay proxy of scripts/delay_proxy.py: an echo server behind it, over real loopback sockets.

Pass/fail never depends on elapsed time (the machine is shared); measured round trips are only printed.
scripts/bench_delay_proxy.py checks the added delay against the configured one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import socket
import subprocess
import sys
import time

import pytest

from scripts.delay_proxy import DelayProxy, parse_target
from tests.conftest import ROOT
from tests.waiting import wait_until


def run_async(test):
    """Run an async test on a fresh event loop (the project uses no pytest asyncio plugin)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return run


@contextlib.asynccontextmanager
async def echo_server():
    """An echo server on a free loopback port; it half-closes when the client does."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    received = await asyncio.wait_for(reader.read(), timeout=60)  # until the echo side closes
    writer.close()
    return received


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@run_async
async def test_bytes_arrive_intact_and_in_order() -> None:
    async with echo_server() as port, DelayProxy(0, ("127.0.0.1", port), delay_ms=5) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        sent = b""
        for i in range(200):  # many small writes: order must hold across chunks
            msg = f"message {i};".encode()
            writer.write(msg)
            sent += msg
        await writer.drain()
        received = b""
        while len(received) < len(sent):
            chunk = await asyncio.wait_for(reader.read(65536), timeout=60)
            assert chunk, "the proxy closed early"
            received += chunk
        assert received == sent
        t0 = time.perf_counter()
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), timeout=60) == b"x"
        print(f"round trip through a 5 ms proxy: {(time.perf_counter() - t0) * 1000:.1f} ms (expect ~10)")
        writer.close()


@pytest.mark.parametrize("mbit", [None, 800.0])
@run_async
async def test_large_transfer_intact(mbit) -> None:
    payload = bytes(range(256)) * (16 * 1024) + b"tail"  # 4 MiB, not a multiple of any chunk size
    async with echo_server() as port, DelayProxy(0, f"127.0.0.1:{port}", delay_ms=2, mbit=mbit) as proxy:
        received = await _roundtrip(proxy.port, payload)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()


@run_async
async def test_concurrent_connections_stay_separate() -> None:
    async with echo_server() as port, DelayProxy(0, ("127.0.0.1", port), delay_ms=3) as proxy:
        payloads = [bytes([i]) * (100_000 + i) for i in range(8)]
        results = await asyncio.gather(*(_roundtrip(proxy.port, p) for p in payloads))
        assert results == payloads
        assert proxy.connections == 8


@run_async
async def test_server_close_reaches_the_client() -> None:
    async def greet_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet_and_close, "127.0.0.1", 0)
    async with server, DelayProxy(0, ("127.0.0.1", server.sockets[0].getsockname()[1]), delay_ms=5) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await asyncio.wait_for(reader.read(), timeout=60) == b"bye"  # read() returns at EOF only
        writer.close()


@run_async
async def test_client_close_reaches_the_server() -> None:
    closed = asyncio.Event()

    async def wait_for_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        closed.set()
        writer.close()

    server = await asyncio.start_server(wait_for_eof, "127.0.0.1", 0)
    async with server, DelayProxy(0, ("127.0.0.1", server.sockets[0].getsockname()[1]), delay_ms=5) as proxy:
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello")
        writer.close()
        await asyncio.wait_for(closed.wait(), timeout=60)


@run_async
async def test_unreachable_target_closes_the_client() -> None:
    with socket_port() as dead_port:
        pass  # the port is free again: nothing listens there
    async with DelayProxy(0, ("127.0.0.1", dead_port), delay_ms=1) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await asyncio.wait_for(reader.read(), timeout=60) == b""
        writer.close()


@contextlib.contextmanager
def socket_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.mark.parametrize("bad", ["9000", "host:", ":9000", "h:70000", "h:x"])
def test_bad_targets_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match="expected a target like"):
        parse_target(bad)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="delay_ms"):
        DelayProxy(0, ("127.0.0.1", 1), delay_ms=-1)
    with pytest.raises(ValueError, match="mbit"):
        DelayProxy(0, ("127.0.0.1", 1), delay_ms=1, mbit=0)
    r = subprocess.run(
        [sys.executable, "scripts/delay_proxy.py", "--listen", "0", "--target", "nowhere", "--delay-ms", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--target" in r.stderr and "nowhere" in r.stderr


def test_cli_proxies_an_echo_server(spawn) -> None:
    async def scenario() -> None:
        async with echo_server() as port:
            with socket_port() as listen:
                pass
            proc = spawn(
                [sys.executable, "scripts/delay_proxy.py", "--listen", str(listen)]
                + ["--target", f"127.0.0.1:{port}", "--delay-ms", "2"],
                name="delay-proxy",
            )
            # The proxy's start is a state to wait for (tests/waiting.py), never a wall-clock verdict.
            await asyncio.to_thread(
                wait_until, lambda: proc.poll() is not None or _listening(listen), what="the proxy listening"
            )
            assert proc.poll() is None, "the proxy exited"
            assert await _roundtrip(listen, b"ping" * 1000) == b"ping" * 1000

    asyncio.run(scenario())
