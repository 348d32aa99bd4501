"""Per-sequence sampling settings as plain data, and the one definition of their limits.

The coordinator's request validation (``coordinator/api_schema.py``), its OpenAPI document
(``coordinator/openapi.py``), the stage frames (``protocol/messages.py``) and the engine's sampler chain
(``engine/sampling.py``) all read ``LIMITS`` from here, so a range is stated once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Limit:
    lo: float  # smallest allowed value (inclusive unless lo_open)
    hi: float  # largest allowed value (inclusive)
    integer: bool = False  # whole numbers only
    lo_open: bool = False  # lo itself is excluded

    def admits(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        return above and value <= self.hi

    def describe(self) -> str:
        left = "(" if self.lo_open else "["
        return f"{left}{self.lo:g}, {self.hi:g}]"


# Field -> allowed range. OpenAI's ranges where OpenAI defines the field (temperature, penalties, top_logprobs).
LIMITS: dict[str, Limit] = {
    "temperature": Limit(0.0, 2.0),
    "top_k": Limit(0, 1_000_000, integer=True),
    "top_p": Limit(0.0, 1.0, lo_open=True),
    "min_p": Limit(0.0, 1.0),
    "repeat_penalty": Limit(0.01, 100.0),
    "presence_penalty": Limit(-2.0, 2.0),
    "frequency_penalty": Limit(-2.0, 2.0),
    "n_logprobs": Limit(0, 20, integer=True),
}
SEED_LIMIT = 2**32  # seeds are taken modulo this (llama.cpp's samplers take a uint32)
LOGIT_BIAS_LIMIT = Limit(-100.0, 100.0)  # value added to one token's logit
MAX_LOGIT_BIAS = 1024  # entries in one request's logit_bias
MAX_GRAMMAR_BYTES = 1 << 20  # GBNF text of one sequence
MAX_GRAMMAR_TRIGGERS = 16  # trigger patterns of one lazy grammar
MAX_TRIGGER_CHARS = 1024  # characters of one trigger pattern


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus mass to keep; 1 = off
    min_p: float = 0.0  # drop tokens below min_p x the top probability; 0 = off
    repeat_penalty: float = 1.0  # divide logits of recently seen tokens; 1 = off
    presence_penalty: float = 0.0  # subtract once for each seen token; 0 = off
    frequency_penalty: float = 0.0  # subtract per occurrence of each seen token; 0 = off
    seed: int | None = None  # random seed; None = a fresh one per sequence
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added logit
    n_logprobs: int = 0  # how many top alternatives to report per token (0 = only the chosen token's)
    want_logprobs: bool = False  # report the chosen token's log-probability
    grammar: str | None = None  # GBNF grammar the output must follow (root rule "root"); None = free text
    # Regexes over the generated text: with any, the grammar is lazy (free text until one matches, llama.h).
    grammar_triggers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if not limit.admits(value):
                raise ValueError(f"{_public_name(name)} must be in {limit.describe()}, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be in [0, {SEED_LIMIT})")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} entries")
        for tok, bias in self.logit_bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ValueError(f"logit_bias key {tok!r} is not a token id")
            if not LOGIT_BIAS_LIMIT.admits(bias):
                raise ValueError(f"logit_bias value for {tok} must be in {LOGIT_BIAS_LIMIT.describe()}")
        if self.grammar is not None and (
            not isinstance(self.grammar, str) or len(self.grammar.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES
        ):
            raise ValueError(f"grammar must be a string of at most {MAX_GRAMMAR_BYTES} bytes")
        if (
            not isinstance(self.grammar_triggers, tuple)
            or len(self.grammar_triggers) > MAX_GRAMMAR_TRIGGERS
            or not all(isinstance(t, str) and 0 < len(t) <= MAX_TRIGGER_CHARS for t in self.grammar_triggers)
        ):
            raise ValueError(
                f"grammar_triggers must be at most {MAX_GRAMMAR_TRIGGERS} patterns of 1..{MAX_TRIGGER_CHARS} characters"
            )
        if self.grammar_triggers and self.grammar is None:
            raise ValueError("grammar_triggers need a grammar")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_wire(self) -> dict:
        d = asdict(self)
        d["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        if d["grammar"] is None:
            del d["grammar"]
        if self.grammar_triggers:
            d["grammar_triggers"] = list(self.grammar_triggers)
        else:
            del d["grammar_triggers"]
        return d

    @classmethod
    def from_wire(cls, d: dict) -> SamplingParams:
        """Settings from a frame; raises ``ValueError`` naming an unknown field or a value out of range."""
        if not isinstance(d, dict):
            raise ValueError("sampling must be an object")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown sampling fields: {sorted(unknown)}")
        d = dict(d)
        if "logit_bias" in d:
            d["logit_bias"] = {int(k): float(v) for k, v in dict(d["logit_bias"]).items()}
        if "grammar_triggers" in d:
            d["grammar_triggers"] = tuple(d["grammar_triggers"])
        return cls(**d)


def _public_name(field_name: str) -> str:
    return "top_logprobs" if field_name == "n_logprobs" else field_name
