"""The draft model source (``coordinator/draft_model.py``) in process: its proposals are its greedy continuation,
it rewinds past rejected proposals, and a draft with another vocabulary is refused at start."""

from __future__ import annotations

import asyncio

import pytest

from chatloop.config import CoordinatorConfig, SpeculativeConfig, load_config
from chatloop.coordinator.draft_model import DraftModel, DraftModelError
from chatloop.coordinator.main import draft_model_error
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.sequence import Sequence
from chatloop.coordinator.speculation import Speculator
from chatloop.coordinator.step_plan import PlannedStep
from chatloop.demo import demo_gguf, demo_model_dir
from chatloop.engine.tokenizer import Tokenizer
from chatloop.protocol.sampling import SamplingParams
from tests.reference import whole_model_greedy


@pytest.fixture(scope="module")
def served():
    tok = Tokenizer(demo_gguf())
    yield tok
    tok.close()


@pytest.fixture(scope="module")
def draft(served):
    d = DraftModel(demo_gguf(), served, threads=2, max_sequences=4)
    yield d
    d.close()


def test_proposals_are_the_drafts_greedy_continuation_and_rewind(draft, served):
    prompt = served.tokenize("The capital of France is Paris. The capital of Italy is")
    with whole_model_greedy(12) as (_, generate):
        ref = generate(prompt)
        got = asyncio.run(draft.propose(7, prompt, 6))
        assert got == ref[:6]
        # Two proposals accepted, then the target picked another token: the draft drops the rest and continues
        # from what the sequence really has.
        other = (ref[2] + 1) % served.n_vocab
        tokens = prompt + ref[:2] + [other]
        got = asyncio.run(draft.propose(7, tokens, 4))
        assert got == generate(tokens, 4)
        assert draft.runtime.seq_len(7) == len(tokens) + 3
    asyncio.run(draft.release(7))
    assert draft.runtime.seq_len(7) == 0


def test_speculator_with_a_draft_model(draft, served):
    spec = Speculator(SpeculativeConfig(method="draft", draft_model=str(demo_gguf())), CoordinatorMetrics("m"), draft)
    for i in range(20):
        spec.cost.observe(1, i % 4, 0.040 + 0.001 * (1 + i % 4))
    prompt = served.tokenize("1, 2, 3, 4, 5,")
    seq = Sequence("r", prompt, 32, SamplingParams())
    seq.tokens.append(served.tokenize(" 6", add_special=False)[0])
    seq.n_cached = len(seq.tokens) - 1
    (p,) = asyncio.run(spec.attach([PlannedStep(seq, seq.n_cached, 1, True)]))
    assert p.draft and seq.speculation.source == "draft"
    with whole_model_greedy(8) as (_, generate):
        assert list(p.draft) == generate(seq.tokens, len(p.draft))
    spec.record(p, len(p.draft))
    assert spec.view()["sources"]["draft"]["accepted_tokens"] == len(p.draft)
    asyncio.run(spec.forget(seq))
    assert draft.runtime.seq_len(seq.id) == 0


def test_a_draft_with_another_vocabulary_is_refused(served, tiny_llama_gguf):
    with pytest.raises(DraftModelError, match="vocabulary"):
        DraftModel(tiny_llama_gguf, served)
    cfg = load_config(
        CoordinatorConfig,
        overrides={
            "stages": [["http://127.0.0.1:1"]],
            "model_dir": str(demo_model_dir(2)),
            "speculative": {"method": "draft", "draft_model": str(tiny_llama_gguf)},
        },
        env={},
    )
    message = draft_model_error(cfg)
    assert message and "vocabulary" in message and tiny_llama_gguf.name in message
    ok = load_config(
        CoordinatorConfig,
        overrides={"stages": [["http://127.0.0.1:1"]], "model_dir": str(demo_model_dir(2)),
                   "speculative": {"method": "draft", "draft_model": str(demo_gguf())}},
        env={},
    )  # fmt: skip
    assert draft_model_error(ok) is None
