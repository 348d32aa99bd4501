"""Reading a server-sent event stream of the OpenAI API in tests: one JSON object per ``data:`` line."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The stream's JSON events in order, without the closing ``[DONE]``."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])
