"""The streaming client: one streamed greedy ``POST /v1/completions``, with the arrival time of every chunk."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field


@dataclass
class StreamResult:
    sent: float  # perf_counter when the request went out
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk that carried text
    text: str = ""
    tokens: int = 0  # generated tokens (usage.completion_tokens, else text chunks)
    prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent if self.chunk_times else float("nan")

    @property
    def done(self) -> float:
        return self.chunk_times[-1] if self.chunk_times else self.sent

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def greedy_chat_body(messages: list[dict], max_tokens: int, **extra) -> dict:
    """A streamed greedy ``/v1/chat/completions`` body that ends with a usage chunk; ``extra`` adds fields."""
    return {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


async def stream_completion(session, url: str, prompt: list[int] | str, max_tokens: int) -> StreamResult:
    """One streamed greedy ``/v1/completions`` request; the time of each text-carrying SSE chunk is kept."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = StreamResult(sent=time.perf_counter())
    usage_tokens = None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                now = time.perf_counter()
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])[:200]
                    break
                for choice in obj.get("choices") or []:
                    text = choice.get("text") or ""
                    if text:
                        res.chunk_times.append(now)
                        res.text += text
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                    res.prompt_tokens = obj["usage"].get("prompt_tokens") or 0
    except Exception as exc:  # noqa: BLE001 - reported in the result
        res.error = f"{type(exc).__name__}: {exc}"
    res.tokens = usage_tokens if usage_tokens is not None else len(res.chunk_times)
    return res
