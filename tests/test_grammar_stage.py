"""A grammar in a final stage's sampling (real llama.cpp, the demo model as one stage): constrained picks, the
grammar rebuilt from replayed tokens as after a failover, and refusals that leave the stage as it was."""

from __future__ import annotations

import numpy as np
import pytest

from chatloop.demo import demo_gguf
from chatloop.engine.errors import InvalidStepError
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime
from chatloop.engine.tokenizer import Tokenizer
from chatloop.protocol.messages import SeqStep
from chatloop.protocol.sampling import SamplingParams

GRAMMAR = 'root ::= "The answer is " ("yes" | "no" | "maybe") "."'


@pytest.fixture(scope="module")
def stage():
    tok = Tokenizer(demo_gguf())
    rt = StageRuntime(demo_gguf(), StageRole(True, True), RuntimeOptions(n_threads=2, n_ctx=1024, max_sequences=2))
    yield rt, tok
    rt.close()
    tok.close()


def _generate(rt: StageRuntime, tok: Tokenizer, seq: int, prompt: list[int], sampling, n: int) -> list[int]:
    out = [rt.forward([SeqStep(seq, 0, len(prompt), sample=True, sampling=sampling)], np.array(prompt, np.int32))]
    toks = [out[0][0].token]
    pos = len(prompt)
    while len(toks) < n and not tok.is_eog(toks[-1]):
        toks.append(rt.forward([SeqStep(seq, pos, 1, sample=True)], np.array([toks[-1]], np.int32))[0].token)
        pos += 1
    return toks


def test_constrained_greedy_output_and_replay(stage):
    rt, tok = stage
    prompt = tok.tokenize("Is the sky green?", add_special=True, parse_special=True)
    sampling = SamplingParams(grammar=GRAMMAR)
    toks = _generate(rt, tok, 1, prompt, sampling, 24)
    rt.release(1)
    assert tok.is_eog(toks[-1])
    text = tok.detokenize(toks[:-1])
    assert text in ("The answer is yes.", "The answer is no.", "The answer is maybe."), text
    # A replacement replica: prompt and the first k generated tokens replayed, the grammar rebuilt from them.
    k = 3
    history = prompt + toks[:k]
    step = SeqStep(2, 0, len(history), sample=True, sampling=sampling, accept=toks[:k])
    (got,) = rt.forward([step], np.array(history, np.int32))
    assert got.token == toks[k]
    rt.release(2)


def test_replayed_token_outside_the_grammar_is_refused_and_changes_nothing(stage):
    rt, tok = stage
    prompt = tok.tokenize("Hello", add_special=True, parse_special=True)
    bad = tok.tokenize(" banana", add_special=False, parse_special=False)
    step = SeqStep(3, 0, len(prompt), sample=True, sampling=SamplingParams(grammar=GRAMMAR), accept=bad)
    live = rt.live_sequences
    with pytest.raises(InvalidStepError, match="accept"):
        rt.forward([step], np.array(prompt, np.int32))
    assert rt.live_sequences == live
    # The slot is still free: the same sequence starts cleanly with a good request.
    toks = _generate(rt, tok, 3, prompt, SamplingParams(grammar=GRAMMAR), 24)
    assert tok.detokenize(toks[:-1]).startswith("The answer is ")
    rt.release(3)


@pytest.mark.parametrize("gbnf", ["root ::= (", 'root ::= missing "x"', "", 'root ::= "a" <|no_such_token|>'])
def test_bad_grammar_is_an_invalid_step(stage, gbnf):
    rt, tok = stage
    prompt = tok.tokenize("Hi", add_special=True, parse_special=True)
    with pytest.raises(InvalidStepError):
        rt.forward(
            [SeqStep(4, 0, len(prompt), sample=True, sampling=SamplingParams(grammar=gbnf))], np.array(prompt, np.int32)
        )


def test_lazy_grammar_is_free_until_its_trigger(stage):
    rt, tok = stage
    prompt = tok.tokenize("Say something.", add_special=True, parse_special=True)
    free = _generate(rt, tok, 5, prompt, SamplingParams(), 12)
    rt.release(5)
    lazy = SamplingParams(grammar='root ::= "<x>" "yes"', grammar_triggers=(r"[\s\S]*?(<x>)[\s\S]*",))
    got = _generate(rt, tok, 5, prompt, lazy, 12)
    rt.release(5)
    assert got == free  # the trigger never appeared: the grammar never constrained
