"""Per-sequence sampling settings and the llama.cpp sampler chain they build.

The chain order follows llama.cpp's ``common_sampler`` defaults: logit bias, penalties, top-k, top-p,
min-p, temperature, then the final pick (greedy at temperature 0, else a seeded random draw). A sequence with a
grammar gets a ``GrammarSampler`` (``engine/grammar.py``): the same chain, with the grammar checked after the
pick as llama-server does, so a grammar costs one check per token rather than a pass over the vocabulary.
"""

from __future__ import annotations

import ctypes
import random

import llama_cpp as llama

from chatloop.engine.errors import InvalidStepError
from chatloop.engine.grammar import GrammarError, GrammarSampler
from chatloop.engine.handles import Sampler
from chatloop.protocol.sampling import SamplingParams

# Cap the list of repeated tokens that the penalties look at, as llama.cpp's default ``penalty_last_n``.
PENALTY_LAST_N = 64


def build_sampler(params: SamplingParams, n_vocab: int, vocab=None) -> Sampler:
    """A fresh sampler chain for one sequence; ``InvalidStepError`` for settings it cannot apply.

    ``vocab``: the model's ``llama_vocab`` pointer, needed for a grammar (token references, piece texts)."""
    if params.grammar is not None:
        if vocab is None:
            raise InvalidStepError("grammar-constrained sampling needs the final stage's vocabulary")
        try:
            chain = GrammarSampler(vocab, n_vocab, params.grammar, trigger_patterns=params.grammar_triggers)
        except GrammarError as exc:
            raise InvalidStepError(str(exc)) from None
    else:
        chain = Sampler()
    try:
        if params.logit_bias:
            bad = [t for t in params.logit_bias if not 0 <= t < n_vocab]
            if bad:
                raise InvalidStepError(
                    f"logit_bias names token ids outside the vocabulary (0..{n_vocab - 1}): {bad[:5]}"
                )
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
