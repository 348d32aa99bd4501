"""OpenAI response bodies: completions, chat completions, their stream chunks, logprobs, usage."""

from __future__ import annotations

import time

from chatloop.coordinator.sequence import Sequence, TokenEvent
from chatloop.engine.tokenizer import Tokenizer


def usage(seq: Sequence) -> dict:
    n_prompt, n_gen = seq.n_prompt, seq.n_generated
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_gen,
        "total_tokens": n_prompt + n_gen,
        "prompt_tokens_details": {"cached_tokens": seq.cached_tokens},
    }


def _tok(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    raw = tokenizer.piece(token)
    return raw.decode("utf-8", "replace"), list(raw)


def chat_logprobs(tokenizer: Tokenizer, events: list[TokenEvent]) -> dict:
    content = []
    for ev in events:
        text, raw = _tok(tokenizer, ev.token)
        top = []
        for t, lp in ev.top or []:
            tt, tr = _tok(tokenizer, t)
            top.append({"token": tt, "logprob": lp, "bytes": tr})
        content.append({"token": text, "logprob": ev.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(tokenizer: Tokenizer, events: list[TokenEvent], offset: int = 0) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for ev in events:
        text, _ = _tok(tokenizer, ev.token)
        tokens.append(text)
        lps.append(ev.logprob)
        tops.append({_tok(tokenizer, t)[0]: lp for t, lp in ev.top} if ev.top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


class Shaper:
    """Builds the bodies for one request of kind completion | chat."""

    def __init__(self, kind: str, model: str, request_id: str, tokenizer: Tokenizer, logprobs: bool) -> None:
        self.kind = kind
        self.model = model
        self.id = request_id
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.text_offset = 0

    def _base(self, chunk: bool) -> dict:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, events: list[TokenEvent], finish: str | None = None, first: bool = False) -> dict:
        body = self._base(chunk=True)
        if self.kind == "chat":
            delta: dict = {}
            if first:
                delta["role"] = "assistant"
            if text or (not finish and not first):
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if self.logprobs and events:
                choice["logprobs"] = chat_logprobs(self.tokenizer, events)
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if self.logprobs and events:
                choice["logprobs"] = completion_logprobs(self.tokenizer, events, self.text_offset)
            self.text_offset += len(text)
        body["choices"] = [choice]
        return body

    def delta_chunk(self, delta: dict, events: list[TokenEvent]) -> dict:
        """A chat chunk carrying ``delta`` as given: ``{"content": ...}`` or ``{"tool_calls": [...]}`` pieces
        from ``tool_parsers.ToolCallStream``."""
        body = self._base(chunk=True)
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        if self.logprobs and events:
            choice["logprobs"] = chat_logprobs(self.tokenizer, events)
        body["choices"] = [choice]
        return body

    def usage_chunk(self, seq: Sequence) -> dict:
        body = self._base(chunk=True)
        body["choices"] = []
        body["usage"] = usage(seq)
        return body

    def full(
        self, text: str | None, events: list[TokenEvent], finish: str, seq: Sequence, tool_calls: list | None = None
    ) -> dict:
        """``tool_calls`` (chat): calls parsed from the reply; ``text`` is then the content around them, or None."""
        body = self._base(chunk=False)
        if self.kind == "chat":
            message: dict = {"role": "assistant", "content": text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            if self.logprobs:
                choice["logprobs"] = chat_logprobs(self.tokenizer, events)
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if self.logprobs:
                choice["logprobs"] = completion_logprobs(self.tokenizer, events)
        body["choices"] = [choice]
        body["usage"] = usage(seq)
        return body
