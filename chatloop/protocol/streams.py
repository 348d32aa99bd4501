"""Persistent binary streams of the chain data plane: one aiohttp WebSocket per link, one frame per message.

Chosen by measurement (``scripts/bench_transport.py``, README "Architecture"): a round trip of a one-row frame
took 0.35 ms as an HTTP POST on a keep-alive session, 0.073 ms on a WebSocket and 0.058 ms on raw TCP with a
length prefix. The WebSocket keeps the stage's one port, its aiohttp server and its cluster-token check, for
0.015 ms more per crossing than raw TCP.

The side that opens a stream sends ``X-ChatLoop-Stream`` (``coordinator`` or ``peer``), the cluster token and,
from a coordinator, its id (``X-ChatLoop-Coordinator``); the stage checks the token before accepting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

log = logging.getLogger(__name__)

STREAM_PATH = "/v1/stream"
PEERS_PATH = "/v1/peers"
ROLE_HEADER = "X-ChatLoop-Stream"
COORD_HEADER = "X-ChatLoop-Coordinator"
TOKEN_HEADER = "X-ChatLoop-Token"
ROLES = ("coordinator", "peer")


class StreamError(ConnectionError):
    """The stream could not be opened, or broke while sending."""


class StreamLink:
    """The opening side of one stream: connects on first use, sends whole frames, hands received frames to
    ``on_frame`` and tells ``on_close`` (with the reason) when the connection ends, at once."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        headers: dict[str, str],
        *,
        connect_timeout: float,
        max_bytes: int = 64 << 20,
        on_frame: Callable[[bytes], None] | None = None,
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        self.session = session
        self.url = url
        self.headers = headers
        self.connect_timeout = connect_timeout
        self.max_bytes = max_bytes
        self.on_frame = on_frame
        self.on_close = on_close
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._connecting = asyncio.Lock()
        self.closed = False  # closed for good by ``close``

    @property
    def open(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def connect(self) -> None:
        async with self._connecting:
            if self.open:
                return
            if self.closed:
                raise StreamError(f"stream to {self.url} is closed")
            timeout = aiohttp.ClientWSTimeout(ws_close=self.connect_timeout)
            try:
                ws = await asyncio.wait_for(
                    self.session.ws_connect(
                        self.url + STREAM_PATH,
                        headers=self.headers,
                        max_msg_size=self.max_bytes,
                        timeout=timeout,
                        autoping=True,
                    ),
                    self.connect_timeout,
                )
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise StreamError(f"cannot open a stream to {self.url}: {_describe(exc)}") from None
            self._ws = ws
            self._reader = asyncio.get_running_loop().create_task(self._read(ws), name=f"stream-{self.url}")

    async def send(self, frame: bytes) -> None:
        """Send one frame, connecting first if needed; raises ``StreamError``."""
        if not self.open:
            await self.connect()
        ws = self._ws
        assert ws is not None
        try:
            # NOTE: aiohttp writes an uncompressed message to the transport in one call, so concurrent sends
            # never interleave their bytes.
            await ws.send_bytes(frame)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise StreamError(f"stream to {self.url} broke: {_describe(exc)}") from None

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        reason = "closed by the other side"
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    if self.on_frame is not None:
                        self.on_frame(msg.data)
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    reason = f"broke: {_describe(ws.exception())}"
                    break
        except asyncio.CancelledError:
            reason = "closed here"
            raise
        except Exception as exc:  # noqa: BLE001 - a reader must end by reporting, never silently
            reason = f"broke: {_describe(exc)}"
            log.exception("stream reader for %s failed", self.url)
        finally:
            if self._ws is ws:
                self._ws = None
            if not ws.closed:
                await asyncio.shield(ws.close())
            if self.on_close is not None and not self.closed:
                self.on_close(reason)

    async def close(self) -> None:
        self.closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        self._ws = None


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
