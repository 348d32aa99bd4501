"""A new sequence that starts from a cached sequence's KV (``SeqStep.prefix_from``): bit-exact with computing the
prefix itself, at every stage of a chain, and refused cleanly when the donor is gone."""

from __future__ import annotations

import numpy as np
import pytest

from chatloop.engine.errors import InvalidStepError, KVMissingError
from chatloop.engine.local_chain import LocalChain
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime
from chatloop.engine.tokenizer import Tokenizer
from chatloop.protocol.messages import SeqStep
from chatloop.protocol.sampling import SamplingParams

GREEDY = SamplingParams()
TEXT = "The keepers of the northern lighthouse kept a log of every storm, every ship and every light. " * 8


@pytest.fixture(scope="module")
def whole(smollm2_gguf):
    rt = StageRuntime(smollm2_gguf, StageRole(True, True), RuntimeOptions(n_threads=2, max_sequences=6, kv_cache_mb=96))
    tok = Tokenizer(smollm2_gguf)
    yield rt, tok.tokenize(TEXT)
    tok.close()
    rt.close()


def _logits_after(rt: StageRuntime, steps: list[SeqStep], tokens: list[int]) -> np.ndarray:
    rt.run(rt.forward, steps, np.asarray(tokens, np.int32))
    return rt.run(rt.logits, -1)


def test_prefix_copy_is_bit_exact_and_leaves_the_donor_intact(whole, record_property):
    rt, prompt = whole
    n = len(prompt)
    full = _logits_after(rt, [SeqStep(1, 0, n, True, GREEDY)], prompt)
    worst = 0.0
    assert n > 2 * 64
    for cut in (
        64,
        n // 64 * 64,
        n - 1,
    ):  # copy the first `cut` positions (whole blocks of the prompt), compute the rest
        copied = _logits_after(rt, [SeqStep(100 + cut, cut, n - cut, True, GREEDY, prefix_from=1)], prompt[cut:])
        worst = max(worst, float(np.abs(copied - full).max()))
        rt.run(rt.release, 100 + cut)
    record_property("max_abs_delta_prefix_copy", worst)
    assert worst == 0.0
    # The donor still holds all of its positions and continues exactly.
    again = _logits_after(rt, [SeqStep(1, n - 1, 1, True)], prompt[-1:])
    assert float(np.abs(again - full).max()) == 0.0
    # Several sequences copy from one donor in one call.
    rt.run(
        rt.forward,
        [SeqStep(7, 64, 64, True, GREEDY, prefix_from=1), SeqStep(8, n - 3, 3, True, GREEDY, prefix_from=1)],
        np.asarray(prompt[64:128] + prompt[n - 3 :], np.int32),
    )
    assert rt.run(rt.seq_len, 7) == 128 and rt.run(rt.seq_len, 8) == n
    with pytest.raises(InvalidStepError):  # a copy may not end inside a block the prompt computes whole
        rt.run(rt.forward, [SeqStep(9, 20, 3, True, GREEDY, prefix_from=1)], np.asarray(prompt[20:23], np.int32))
    for seq in (1, 7, 8):
        rt.run(rt.release, seq)


def test_a_missing_donor_or_a_donor_stepped_in_the_same_call_is_refused_without_side_effects(whole):
    rt, prompt = whole
    with pytest.raises(KVMissingError):
        rt.run(rt.forward, [SeqStep(2, 10, 2, True, GREEDY, prefix_from=999)], np.asarray(prompt[10:12], np.int32))
    assert 2 not in rt.live_ids()
    rt.run(rt.forward, [SeqStep(3, 0, 12)], np.asarray(prompt[:12], np.int32))
    with pytest.raises(KVMissingError):  # the donor holds 12 positions, the step wants 20
        rt.run(rt.forward, [SeqStep(4, 20, 1, True, GREEDY, prefix_from=3)], np.asarray(prompt[20:21], np.int32))
    with pytest.raises(InvalidStepError):
        rt.run(
            rt.forward,
            [SeqStep(3, 12, 1), SeqStep(5, 6, 1, True, GREEDY, prefix_from=3)],
            np.asarray([prompt[12], prompt[6]], np.int32),
        )
    assert rt.live_ids() == {3} and rt.run(rt.seq_len, 3) == 12
    rt.run(rt.release, 3)


def test_every_stage_of_a_chain_copies(stage_dir, smollm2_gguf):
    with LocalChain(stage_dir(smollm2_gguf, stages=3), RuntimeOptions(n_threads=2, max_sequences=4)) as chain:
        prompt = chain.tokenizer.tokenize(TEXT)
        n = len(prompt)
        chain.forward([SeqStep(1, 0, n, True, GREEDY)], np.asarray(prompt, np.int32))
        last = chain.stages[-1]
        full = last.run(last.logits, -1)
        chain.forward([SeqStep(2, n - 5, 5, True, GREEDY, prefix_from=1)], np.asarray(prompt[-5:], np.int32))
        copied = last.run(last.logits, -1)
        assert float(np.abs(copied - full).max()) == 0.0
        chain.release(1)
        chain.release(2)
