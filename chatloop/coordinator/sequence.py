"""One request's generation as the coordinator tracks it, and the events its HTTP handler reads."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from chatloop.config import SpeculativeConfig
from chatloop.coordinator.text import TextStream
from chatloop.protocol.messages import BLOCK_ROWS
from chatloop.protocol.sampling import SamplingParams


@dataclass
class TokenEvent:
    token: int
    text: str  # text safe to emit now (may be empty while a character or a stop string is incomplete)
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class FinishEvent:
    reason: str  # stop | length | error | cancelled
    text: str = ""  # held-back text released at the end
    status: int = 200
    message: str = ""


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    trace_id: str | None = None  # W3C trace id carried to the stages
    speculative: SpeculativeConfig | None = None  # the request's speculative settings; None = the server's
    id: int = field(default_factory=lambda: random.getrandbits(62) + 1)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Prompt then generated tokens in one list that only grows: the per-token path slices it, never rebuilds it.
    tokens: list[int] = field(init=False)
    n_cached: int = 0  # positions every stage of the route holds
    route: list = field(default_factory=list)  # per stage, the Replica serving this sequence (None: not yet chosen)
    sampler_sent: bool = False  # the last stage has this sequence's sampler
    prefix: object | None = None  # the prefix cache entry the first step copies from (CacheEntry), until it is done
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (usage.prompt_tokens_details)
    block_limit: int | None = None  # no 64-row block past this position (see block_end)
    speculation: object | None = None  # speculative decoding state (speculation.SeqSpeculation), made on first use
    failovers: int = 0
    retries: int = 0
    done: bool = False
    finish_reason: str | None = None
    created: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    deadline: float = 0.0  # admission deadline (queue timeout)
    stream: TextStream = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        self.stream = TextStream(self.stop)

    @property
    def block_end(self) -> int:
        """Positions computed in whole 64-row blocks at every stage: the prompt's whole blocks (see
        engine/runtime.py ``plan_decodes``). Fixed for the sequence, so replays and cache hits compute alike
        (``block_limit``: a cache hit that is not exact ended off a block boundary, so no block starts after it)."""
        end = len(self.prompt) if self.block_limit is None else min(len(self.prompt), self.block_limit)
        return end // BLOCK_ROWS * BLOCK_ROWS

    @property
    def n_prompt(self) -> int:
        return len(self.prompt)

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def generated(self) -> list[int]:
        """A copy of the generated tokens (not for the per-token path)."""
        return self.tokens[len(self.prompt) :]

    @property
    def reserved(self) -> int:
        """KV positions this sequence may come to hold."""
        return len(self.prompt) + self.max_tokens

    def reset_cache(self) -> None:
        """The route changed or a stage lost the sequence: replay everything on the next step."""
        self.n_cached = 0
        self.sampler_sent = False
        self.prefix = None
