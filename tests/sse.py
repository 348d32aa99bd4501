"""Reading a server-sent event stream of the OpenAI API in tests: one JSON object per ``data:`` line."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator

import aiohttp


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The stream's JSON events in order, without the closing ``[DONE]``."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def post_sse(url: str, body: dict) -> list[dict]:
    """POST ``body`` and read the whole event stream (blocking); ``[DONE]`` becomes ``{"done": True}``."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data: "):
                payload = line[6:]
                events.append({"done": True} if payload == "[DONE]" else json.loads(payload))
    return events
