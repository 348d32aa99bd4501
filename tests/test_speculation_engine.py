"""Verifying drafts in the engine (real llama.cpp, in process): a step of the last token plus k proposals returns the
accepted proposals and the stage's own token, bit-exact with single-row decoding, and the rows it rejects leave
no trace in the KV of any stage (docs/design.md, "Speculative decoding").

Every logit a verifying step produces is compared with the greedy run that never saw a proposal: the max |delta|
is recorded (``record_property``) and must be 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from chatloop.engine.local_chain import LocalChain
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime
from chatloop.engine.tokenizer import Tokenizer
from chatloop.protocol.messages import SeqStep
from chatloop.protocol.sampling import SamplingParams
from tests.test_engine import (
    BATCH_PROMPTS,
    OPTS,
    SMOL_TEXT,
    Runner,
    chain_runner,
    greedy_trace,
    max_delta,
    runtime_runner,
)

N_GEN = 40


def drafts_with_mistakes(reference: list[int], start: int, k: int, step: int, n_vocab: int) -> tuple[int, ...]:
    """``k`` proposals for the tokens from ``start`` on: the reference's, with one wrong token on most steps (at a
    place that moves from step to step), so that steps accept 0..k of them."""
    draft = list(reference[start : start + k])
    if draft and step % 4 != 3:
        at = step % len(draft)
        draft[at] = (draft[at] + 1 + step) % n_vocab
    return tuple(draft)


def speculative_run(run: Runner, prompt: list[int], reference: list[int], n_vocab: int, seq_id: int = 9, **kw):
    """Generate len(reference) tokens with verifying steps (k = 1..8 in turn); returns (tokens, max |delta| of
    every verified row's logits against ``ref_logits`` when given, accepted proposals)."""
    sampling = kw.get("sampling")
    ref_logits = kw.get("ref_logits")
    out = run.forward([SeqStep(seq_id, 0, len(prompt), sample=True, sampling=sampling)], np.array(prompt, np.int32))
    tokens = [out[0].token]
    worst, accepted, step = 0.0, 0, 0
    while len(tokens) < len(reference):
        k = step % 8 + 1
        room = len(reference) - len(tokens) - 1
        draft = drafts_with_mistakes(reference, len(tokens), min(k, room), step, n_vocab)
        pos = len(prompt) + len(tokens) - 1  # the last token is not in the KV yet
        data = np.array([tokens[-1], *draft], np.int32)
        got = run.forward([SeqStep(seq_id, pos, 1 + len(draft), sample=True, draft=draft)], data)
        assert 1 <= len(got) <= len(draft) + 1
        assert [t.token for t in got[:-1]] == list(draft[: len(got) - 1])  # only the proposals it agreed with
        if ref_logits is not None:
            for j in range(len(got)):
                worst = max(worst, max_delta(run.logits(0, j), ref_logits[len(tokens) + j]))
        accepted += len(got) - 1
        tokens += [t.token for t in got]
        step += 1
    run.release(seq_id)
    return tokens, worst, accepted


@pytest.fixture(scope="module")
def smol_prompt(smollm2_gguf) -> list[int]:
    tok = Tokenizer(smollm2_gguf)
    prompt = tok.tokenize(SMOL_TEXT)[:70]  # one whole 64-token block, then rows
    tok.close()
    return prompt


@pytest.fixture(scope="module")
def smol_whole(smollm2_gguf):
    rt = StageRuntime(smollm2_gguf, StageRole(True, True), OPTS)
    yield rt
    rt.close()


@pytest.mark.parametrize("where", ["whole", "chain3"])
def test_verified_drafts_equal_greedy_and_rejected_rows_leave_no_trace(
    where, smollm2_gguf, smol_whole, smol_prompt, stage_dir, record_property
):
    ref = greedy_trace(runtime_runner(smol_whole), smol_prompt, N_GEN - 1)
    if where == "whole":
        tokens, worst, accepted = speculative_run(
            runtime_runner(smol_whole), smol_prompt, ref.tokens, smol_whole.n_vocab, ref_logits=ref.logits
        )
    else:
        with LocalChain(stage_dir(smollm2_gguf, stages=3, layers="0:10,10:20,20:30"), OPTS) as chain:
            tokens, worst, accepted = speculative_run(
                chain_runner(chain), smol_prompt, ref.tokens, smol_whole.n_vocab, ref_logits=ref.logits
            )
            assert chain.stages[0].live_sequences == 0
    record_property(f"max_abs_delta_speculative_{where}", worst)
    assert tokens == ref.tokens
    assert accepted > 0
    assert worst == 0.0


def test_later_step_after_rejected_rows_equals_a_run_without_them(smol_whole, smol_prompt, record_property):
    """Rows of wrong proposals are computed into the KV, then dropped by the next step (which starts before them):
    that step's logits equal those of a run that never saw the wrong tokens."""
    run = runtime_runner(smol_whole)
    ref = greedy_trace(run, smol_prompt, 9)
    n = len(smol_prompt)
    run.forward([SeqStep(3, 0, n, sample=True)], np.array(smol_prompt, np.int32))
    wrong = tuple((t + 17) % smol_whole.n_vocab for t in ref.tokens[1:8])  # seven proposals, the first one wrong
    got = run.forward([SeqStep(3, n, 8, sample=True, draft=wrong)], np.array([ref.tokens[0], *wrong], np.int32))
    assert [t.token for t in got] == [ref.tokens[1]]
    assert smol_whole.seq_len(3) == n + 8  # the rejected rows are still there until the next step
    got = run.forward([SeqStep(3, n + 1, 1, sample=True)], np.array([ref.tokens[1]], np.int32))
    assert smol_whole.seq_len(3) == n + 2
    delta = max_delta(run.logits(-1), ref.logits[2])
    record_property("max_abs_delta_after_rejected_rows", delta)
    assert got[0].token == ref.tokens[2]
    assert delta == 0.0
    run.release(3)


def test_seeded_sampling_with_drafts_equals_sampling_without(smol_whole, smol_prompt):
    """With prompt lookup there is no draft distribution: the stage keeps a proposal only when its own sampler (the
    request's seed, one draw per token) picks it, so a seeded sampled run is the same with or without drafts."""
    params = SamplingParams(temperature=0.9, top_k=40, seed=1234, repeat_penalty=1.1)
    run = runtime_runner(smol_whole)
    out = run.forward([SeqStep(4, 0, len(smol_prompt), True, params)], np.array(smol_prompt, np.int32))
    plain = [out[0].token]
    while len(plain) < N_GEN:
        pos = len(smol_prompt) + len(plain) - 1
        plain.append(run.forward([SeqStep(4, pos, 1, sample=True)], np.array([plain[-1]], np.int32))[0].token)
    run.release(4)
    tokens, _, accepted = speculative_run(run, smol_prompt, plain, smol_whole.n_vocab, sampling=params)
    assert tokens == plain
    assert accepted > 0


def test_draft_rows_split_over_decode_calls(tiny_llama_gguf):
    """A draft longer than one llama_decode call (n_batch 4): the stage samples row after row across calls."""
    opts = RuntimeOptions(n_threads=2, n_ctx=512, max_sequences=2, n_batch=4, n_ubatch=4)
    with StageRuntime(tiny_llama_gguf, StageRole(True, True), opts) as rt:
        run = runtime_runner(rt)
        rng = np.random.default_rng(3)
        prompt = [1] + rng.integers(3, rt.n_vocab, 20).tolist()
        ref = greedy_trace(run, prompt, 24)
        tokens, worst, _ = speculative_run(run, prompt, ref.tokens, rt.n_vocab, ref_logits=None)
        assert tokens == ref.tokens
        # All proposals right, eight of them: rows go through three calls and every one is accepted.
        run.forward([SeqStep(6, 0, len(prompt), sample=True)], np.array(prompt, np.int32))
        draft = tuple(ref.tokens[1:9])
        got = run.forward([SeqStep(6, len(prompt), 9, sample=True, draft=draft)], np.array(ref.tokens[:9], np.int32))
        assert [t.token for t in got] == ref.tokens[1:10]


def test_sequences_with_different_drafts_in_one_call(smol_whole, smollm2_gguf):
    """Continuous batching: four sequences in every forward call, each with its own number of proposed rows (0..4,
    changing from step to step), produce what each produces alone."""
    tok = Tokenizer(smollm2_gguf)
    prompts = [tok.tokenize(p) for p in BATCH_PROMPTS]
    tok.close()
    run = runtime_runner(smol_whole)
    refs = [greedy_trace(run, p, 24, seq_id=20 + i).tokens for i, p in enumerate(prompts)]
    ids = [30 + i for i in range(len(prompts))]
    data = np.concatenate([np.array(p, np.int32) for p in prompts])
    out = run.forward([SeqStep(s, 0, len(p), sample=True) for s, p in zip(ids, prompts)], data)
    tokens = [[o.token] for o in out]
    step = 0
    while any(len(t) < len(r) for t, r in zip(tokens, refs)):
        steps, rows = [], []
        for i, (s, p, t, r) in enumerate(zip(ids, prompts, tokens, refs)):
            if len(t) >= len(r):
                continue
            k = min((step + i) % 5, len(r) - len(t) - 1)
            draft = drafts_with_mistakes(r, len(t), k, step + i, smol_whole.n_vocab) if k else ()
            steps.append(SeqStep(s, len(p) + len(t) - 1, 1 + len(draft), sample=True, draft=draft))
            rows += [t[-1], *draft]
        got = run.forward(steps, np.array(rows, np.int32))
        for st in steps:
            tokens[ids.index(st.seq_id)] += [g.token for g in got if g.seq_id == st.seq_id]
        step += 1
    for s in ids:
        run.release(s)
    assert tokens == refs


def test_grammar_sampler_verifies_drafts_as_it_samples(tiny_llama_gguf):
    """A grammar-constrained sequence: proposals the grammar forbids are never accepted (the stage's own pick is
    checked by the grammar sampler first), and the output equals the run without proposals."""
    params = SamplingParams(grammar='root ::= ("the" | "of" | "and" | " ")+')
    with StageRuntime(tiny_llama_gguf, StageRole(True, True), OPTS) as rt:
        run = runtime_runner(rt)
        prompt = [1, 5, 6, 7]
        out = run.forward([SeqStep(2, 0, len(prompt), True, params)], np.array(prompt, np.int32))
        plain = [out[0].token]
        while len(plain) < 20:
            step = SeqStep(2, len(prompt) + len(plain) - 1, 1, sample=True)
            plain.append(run.forward([step], np.array([plain[-1]], np.int32))[0].token)
        run.release(2)
        tokens, _, accepted = speculative_run(run, prompt, plain, rt.n_vocab, seq_id=2, sampling=params)
        assert tokens == plain
        assert accepted > 0


def test_sampled_statistics_unchanged_with_a_poor_draft(smol_whole, smollm2_gguf, record_property):
    """Sampling at temperature 1.2 over 16 seeds, every step proposing the greedy continuation (a poor guess for such
    sampling) or random tokens: each seed's tokens, hence every statistic of them, are the same as without
    proposals. (Prompt lookup and the draft model are verified by the target's own draws: no q to correct for.)"""
    tok = Tokenizer(smollm2_gguf)
    prompt = tok.tokenize("My favourite animal is the")
    tok.close()
    run = runtime_runner(smol_whole)
    greedy = greedy_trace(run, prompt, 3).tokens
    rng = np.random.default_rng(0)
    accepted, firsts = 0, []
    for seed in range(16):
        params = SamplingParams(temperature=1.2, seed=seed)
        out = run.forward([SeqStep(40, 0, len(prompt), True, params)], np.array(prompt, np.int32))
        plain = [out[0].token]
        for i in range(3):
            step = SeqStep(40, len(prompt) + i, 1, sample=True)
            plain.append(run.forward([step], np.array([plain[-1]], np.int32))[0].token)
        run.release(40)
        out = run.forward([SeqStep(41, 0, len(prompt), True, params)], np.array(prompt, np.int32))
        spec = [out[0].token]
        while len(spec) < len(plain):
            n = min(3, len(plain) - len(spec) - 1)
            poor = greedy[len(spec) : len(spec) + n] if seed % 2 else rng.integers(0, smol_whole.n_vocab, n).tolist()
            step = SeqStep(41, len(prompt) + len(spec) - 1, 1 + n, sample=True, draft=tuple(poor))
            got = run.forward([step], np.array([spec[-1], *poor], np.int32))
            accepted += len(got) - 1
            spec += [g.token for g in got]
        run.release(41)
        assert spec == plain, seed
        firsts.append(plain[1])
    record_property("sampled_distinct_second_tokens", len(set(firsts)))
    record_property("sampled_accepted_proposals", accepted)
    assert len(set(firsts)) > 1  # it really samples
