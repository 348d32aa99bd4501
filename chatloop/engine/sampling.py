"""Per-sequence sampling settings and the llama.cpp sampler chain they build.

The chain order follows llama.cpp's ``common_sampler`` defaults: logit bias, penalties, top-k, top-p,
min-p, temperature, then the final pick (greedy at temperature 0, else a seeded random draw).
"""

from __future__ import annotations

import ctypes
import math
import random
from dataclasses import asdict, dataclass, field

import llama_cpp as llama

from chatloop.engine.handles import Sampler

# Cap the list of repeated tokens that the penalties look at, as llama.cpp's default ``penalty_last_n``.
PENALTY_LAST_N = 64


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

    def __post_init__(self) -> None:
        checks = [
            (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (0 <= self.top_k <= 1_000_000, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (
                math.isfinite(self.repeat_penalty) and 0.0 < self.repeat_penalty <= 100.0,
                "repeat_penalty must be in (0, 100]",
            ),
            (
                math.isfinite(self.presence_penalty) and abs(self.presence_penalty) <= 2.0,
                "presence_penalty must be in [-2, 2]",
            ),
            (
                math.isfinite(self.frequency_penalty) and abs(self.frequency_penalty) <= 2.0,
                "frequency_penalty must be in [-2, 2]",
            ),
            (self.seed is None or 0 <= self.seed < 2**32, "seed must be in [0, 2^32)"),
            (0 <= self.n_logprobs <= 20, "top_logprobs must be in [0, 20]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_wire(self) -> dict:
        d = asdict(self)
        d["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        return d

    @classmethod
    def from_wire(cls, d: dict) -> SamplingParams:
        if not isinstance(d, dict):
            raise ValueError("sampling must be an object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown sampling fields: {sorted(unknown)}")
        d = dict(d)
        if "logit_bias" in d:
            d["logit_bias"] = {int(k): float(v) for k, v in dict(d["logit_bias"]).items()}
        return cls(**d)


def build_sampler(params: SamplingParams, n_vocab: int) -> Sampler:
    """A fresh sampler chain for one sequence."""
    chain = Sampler()
    try:
        if params.logit_bias:
            bad = [t for t in params.logit_bias if not 0 <= t < n_vocab]
            if bad:
                raise ValueError(f"logit_bias names token ids outside the vocabulary (0..{n_vocab - 1}): {bad[:5]}")
            arr = (llama.llama_logit_bias * len(params.logit_bias))()
            for i, (tok, bias) in enumerate(params.logit_bias.items()):
                arr[i].token = tok
                arr[i].bias = bias
            chain.add(llama.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), arr))
        if params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            chain.add(
                llama.llama_sampler_init_penalties(
                    n_vocab, PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
                )
            )
        if params.temperature <= 0.0:
            chain.add(llama.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            chain.add(llama.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            chain.add(llama.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            chain.add(llama.llama_sampler_init_min_p(params.min_p, 1))
        chain.add(llama.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        chain.add(llama.llama_sampler_init_dist(ctypes.c_uint32(seed).value))
        return chain
    except BaseException:
        chain.close()
        raise
