"""A TCP proxy that adds a fixed one-way latency (and optionally a bandwidth cap) in each direction.

``tc netem`` is not available on the development machines, so slow links between the coordinator and the
stages are simulated with this proxy: point a coordinator's stage URL at the proxy's port instead of the
stage's own (scripts/README.md).

Every chunk read at time t is written at t + delay, in order. The delay is a deadline, not a sleep per
chunk: chunks that arrive 1 ms apart leave 1 ms apart, so a stream of N chunks takes delay + its own
duration, never N x delay. With ``mbit`` each direction is also a link of that bandwidth: a chunk starts
its transmission when the previous one has finished, so a burst queues as on a real link.

Library use (N proxies in one process)::

    async with DelayProxy(9100, ("127.0.0.1", 9000), delay_ms=5) as proxy:
        ...  # connect to 127.0.0.1:9100 (proxy.port when 0 was given)

CLI::

    python scripts/delay_proxy.py --listen 9100 --target 127.0.0.1:9000 --delay-ms 5 [--mbit 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import selectors
import signal
import socket
import sys

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
# Chunks waiting per direction before the proxy stops reading: backpressure instead of unbounded memory
# (64 MiB at most per direction, far above bandwidth x delay of any link simulated here).
QUEUE_CHUNKS = 1024
_EOF = b""


def parse_target(text: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[::1]:port"``) -> ``(host, port)``; a ValueError names what is wrong."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected a target like 127.0.0.1:9000, got {text!r}")
    return host, int(port)


class _Link:
    """One direction's clock: when a chunk received now may leave, given the delay and the bandwidth."""

    def __init__(self, delay_s: float, mbit: float | None) -> None:
        self.delay_s = delay_s
        self.bytes_per_s = mbit * 1e6 / 8 if mbit else None
        self.busy_until = 0.0  # when the link finishes transmitting what it was already given

    def departure(self, now: float, nbytes: int) -> float:
        if self.bytes_per_s is None:
            return now + self.delay_s
        start = max(now, self.busy_until)
        self.busy_until = start + nbytes / self.bytes_per_s
        return self.busy_until + self.delay_s


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
    """Copy one direction: each chunk read is written by a timer at its departure time, straight from the event
    loop's timer queue (no task to wake on the way out: the proxy's own cost stays far below the delay)."""
    loop = asyncio.get_running_loop()
    room = asyncio.Event()  # set while fewer than QUEUE_CHUNKS chunks wait for their departure
    room.set()
    waiting = 0
    last = 0.0
    failed: list[BaseException] = []

    def depart(data: bytes) -> None:
        nonlocal waiting
        waiting -= 1
        if waiting < QUEUE_CHUNKS:
            room.set()
        if failed or writer.is_closing():
            return
        try:
            if data:
                writer.write(data)
            elif writer.can_write_eof():
                # NOTE: a half-close travels like data (after the delay), so request/response protocols
                # that close one side first keep working.
                writer.write_eof()
        except (ConnectionError, OSError, RuntimeError) as exc:
            failed.append(exc)

    while True:
        try:
            data = await reader.read(CHUNK_BYTES)
        except (ConnectionError, OSError):
            data = _EOF
        # NOTE: departures strictly increase, so timers of equal deadlines cannot swap two chunks.
        last = max(link.departure(loop.time(), len(data)), last + 1e-9)
        waiting += 1
        loop.call_at(last, depart, data)
        if not data:
            break
        if waiting >= QUEUE_CHUNKS:
            room.clear()
            await room.wait()
        await writer.drain()  # the far side's backpressure reaches the reader
    # The EOF departs at ``last``; the connection ends after it (a broken write ends it at once).
    while waiting and not failed:
        room.clear()
        await room.wait()
    if failed:
        raise failed[0]


class DelayProxy:
    """Listens on ``listen_host:listen_port`` and forwards every connection to ``target`` with a delay."""

    def __init__(
        self,
        listen_port: int,
        target: tuple[str, int] | str,
        delay_ms: float,
        mbit: float | None = None,
        listen_host: str = "127.0.0.1",
    ) -> None:
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be 0 or more, got {delay_ms}")
        if mbit is not None and mbit <= 0:
            raise ValueError(f"mbit must be greater than 0, got {mbit}")
        self.target = parse_target(target) if isinstance(target, str) else (str(target[0]), int(target[1]))
        self.listen_host = listen_host
        self.port = listen_port
        self.delay_s = delay_ms / 1000.0
        self.mbit = mbit
        self.connections = 0  # accepted so far
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "delay proxy %s:%d -> %s:%d, %.1f ms each way%s",
            self.listen_host,
            self.port,
            *self.target,
            self.delay_s * 1000,
            f", {self.mbit} Mbit/s" if self.mbit else "",
        )
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> DelayProxy:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log.warning("delay proxy: cannot reach %s:%d (%s)", *self.target, exc)
            client_w.close()
            return
        for w in (client_w, server_w):
            sock = w.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # NOTE: Nagle would hold small frames back for an ACK, adding a round trip to the delay.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = asyncio.create_task(_pump(client_r, server_w, _Link(self.delay_s, self.mbit)))
        down = asyncio.create_task(_pump(server_r, client_w, _Link(self.delay_s, self.mbit)))
        try:
            done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    log.debug("delay proxy: connection ended: %r", task.exception())
            # A failed direction (reset, broken pipe) ends the connection; a clean EOF waits for the other side.
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for task in (up, down):
                task.cancel()
            for w in (client_w, server_w):
                w.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await w.wait_closed()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="TCP proxy adding a one-way delay (and a bandwidth cap) each way")
    p.add_argument("--listen", type=int, required=True, metavar="PORT", help="port to listen on (0 = a free one)")
    p.add_argument("--listen-host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="where to forward connections")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay in milliseconds, each direction")
    p.add_argument("--mbit", type=float, help="bandwidth cap per direction and connection, in Mbit/s")
    args = p.parse_args(argv)
    try:
        args.target = parse_target(args.target)
    except ValueError as exc:
        p.error(f"--target: {exc}")
    if args.delay_ms < 0:
        p.error(f"--delay-ms must be 0 or more, got {args.delay_ms}")
    if args.mbit is not None and args.mbit <= 0:
        p.error(f"--mbit must be greater than 0, got {args.mbit}")
    return args


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with DelayProxy(args.listen, args.target, args.delay_ms, args.mbit, args.listen_host) as proxy:
        print(f"delay proxy listening on {proxy.listen_host}:{proxy.port} -> {args.target[0]}:{args.target[1]}")
        sys.stdout.flush()
        await stop.wait()


def precise_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire within microseconds of their deadline: the default epoll selector waits in
    whole milliseconds (rounded up), which would add up to 1 ms to a chunk's delay whenever other traffic woke the
    loop in between (scripts/README.md, "delay_proxy.py"). select() waits in microseconds; a proxy has few sockets."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        loop = precise_loop()
        try:
            loop.run_until_complete(_main(args))
        finally:
            loop.close()
    except OSError as exc:
        print(f"delay_proxy: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
