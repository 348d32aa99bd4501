"""Greedy continuations of the whole demo model in one process: what every served configuration must reproduce."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from chatloop.demo import demo_gguf
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime
from chatloop.engine.tokenizer import Tokenizer
from chatloop.protocol.messages import SeqStep


@contextmanager
def whole_model_greedy(default_tokens: int) -> Iterator[tuple[Tokenizer, Callable[..., list[int]]]]:
    """(tokenizer, generate(prompt ids, n=default_tokens) -> token ids up to and including an end token)."""
    tok = Tokenizer(demo_gguf())
    rt = StageRuntime(demo_gguf(), StageRole(True, True), RuntimeOptions(n_threads=2, n_ctx=2048, max_sequences=1))
    cache: dict[tuple, list[int]] = {}

    def generate(prompt: list[int], n: int = default_tokens) -> list[int]:
        key = (tuple(prompt), n)
        if key not in cache:
            toks = [rt.forward([SeqStep(1, 0, len(prompt), sample=True)], np.array(prompt, np.int32))[0].token]
            pos = len(prompt)
            while len(toks) < n and not tok.is_eog(toks[-1]):
                out = rt.forward([SeqStep(1, pos, 1, sample=True)], np.array([toks[-1]], np.int32))[0].token
                toks.append(out)
                pos += 1
            rt.release(1)
            cache[key] = toks
        return cache[key]

    try:
        yield tok, generate
    finally:
        rt.close()
        tok.close()
