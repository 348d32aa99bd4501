"""The speculation policy (``coordinator/speculation.py``), the draft on the wire and the request field, on made-up
sequences: no stage, no model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from chatloop.config import ConfigError, CoordinatorConfig, SpeculativeConfig, load_config
from chatloop.coordinator.api_schema import RequestError, parse_completion
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.sequence import Sequence
from chatloop.coordinator.speculation import MAX_PAUSE_STEPS, PAUSE_STEPS, Speculator
from chatloop.coordinator.step_plan import PlannedStep
from chatloop.protocol.frames import FrameError
from chatloop.protocol.messages import MAX_DRAFT, SeqStep, decode_forward, encode_forward, parse_steps
from chatloop.protocol.sampling import SamplingParams

COPY = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]


def seq(tokens=COPY, generated=(10, 11), max_tokens=64, **kw) -> Sequence:
    s = Sequence("r", list(tokens), max_tokens, SamplingParams(), **kw)
    s.tokens.extend(generated)
    s.n_cached = len(s.tokens) - 1
    return s


def decode(s: Sequence) -> PlannedStep:
    return PlannedStep(s, s.n_cached, 1, True)


def speculator(**kw) -> Speculator:
    return Speculator(SpeculativeConfig(**kw), CoordinatorMetrics("m"))


def test_a_decode_step_gets_the_lookup_continuation():
    spec = speculator(max_tokens=8)
    s = seq()
    (p,) = spec.attach([decode(s)], n_active=1)
    assert p.draft == (12, 13, 14, 15)  # first lookahead: min(max_tokens, 4)
    assert p.rows == 5
    assert p.token_ids().tolist() == [11, 12, 13, 14, 15]


def test_lookahead_grows_on_success_and_shrinks_on_failure():
    spec = speculator(max_tokens=8)
    s = seq()
    (p,) = spec.attach([decode(s)], 1)
    spec.record(p, 4)
    assert s.speculation.k == 8
    spec.record(dataclasses.replace(p, draft=(1,) * 8), 2)
    assert s.speculation.k == 3
    spec.record(dataclasses.replace(p, draft=(1,) * 3), 0)
    assert s.speculation.k == 1
    totals = spec.view()
    assert totals["proposed_tokens"] == 15 and totals["accepted_tokens"] == 6 and totals["verify_steps"] == 3
    assert totals["sources"]["ngram"]["mean_accepted_length"] == 2.0


def test_no_proposals_past_max_tokens_or_for_prompt_chunks():
    spec = speculator(max_tokens=8)
    s = seq(max_tokens=4)  # two generated: room for one more token after the step's own
    (p,) = spec.attach([decode(s)], 1)
    assert p.draft == (12,)
    s2 = seq()
    chunk = PlannedStep(s2, 0, len(s2.tokens), True)
    assert spec.attach([chunk], 1) == [chunk]


def test_off_by_config_and_by_request():
    assert speculator(method="off").attach([decode(seq())], 1)[0].draft == ()
    on = seq(speculative=SpeculativeConfig(method="ngram", max_tokens=2))
    off = seq(speculative=SpeculativeConfig(method="off"))
    spec = speculator(method="off")
    drafts = [p.draft for p in spec.attach([decode(on), decode(off)], 2)]
    assert drafts == [(12, 13), ()]


def test_many_sequences_leave_no_rows_to_spare():
    spec = speculator(max_tokens=8, max_batch_rows=16)
    members = [seq() for _ in range(16)]
    assert all(not p.draft for p in spec.attach([decode(s) for s in members], 16))
    # Eight running, four in this micro-batch: (16 - 8) * 4 / 8 = 4 spare rows, to the best acceptance first.
    members = [seq() for _ in range(4)]
    plan = [decode(s) for s in members]
    spec.attach(plan[:1], 1)  # give the first one a state ...
    members[0].speculation.rate = 0.9  # ... with the best acceptance so far
    drafts = [p.draft for p in spec.attach(plan, 8)]
    assert sum(map(len, drafts)) == 4
    assert drafts[0] == (12, 13, 14, 15)


def test_a_sequence_whose_proposals_fail_pauses_then_tries_again():
    spec = speculator(max_tokens=4, min_acceptance=0.1)
    s = seq()
    for _ in range(10):
        (p,) = spec.attach([decode(s)], 1)
        assert p.draft
        spec.record(p, 0)
        if s.speculation.pause:
            break
    assert s.speculation.pause == PAUSE_STEPS
    for _ in range(PAUSE_STEPS):
        assert spec.attach([decode(s)], 1)[0].draft == ()
    (p,) = spec.attach([decode(s)], 1)
    assert len(p.draft) == 1  # back, with one proposal
    st = s.speculation
    st.strikes = 20
    st.steps, st.rate = 10, 0.0
    spec.record(p, 0)
    assert st.pause == MAX_PAUSE_STEPS


def test_draft_travels_on_the_wire():
    steps = [SeqStep(7, 40, 4, sample=True, draft=(5, 6, 7)), SeqStep(8, 3, 1, sample=True)]
    buf = encode_forward(steps, np.arange(5, dtype=np.int32))
    got = decode_forward(buf, first=True, n_embd=8, max_bytes=1 << 20, max_steps=8)
    assert got.steps == steps


@pytest.mark.parametrize(
    "step",
    [
        {"seq": 1, "pos": 0, "n": 3, "draft": [1, 2, 3]},  # as many proposals as rows
        {"seq": 1, "pos": 0, "n": 64, "draft": list(range(MAX_DRAFT + 1))},
        {"seq": 1, "pos": 0, "n": 3, "draft": [1, "2"]},
        {"seq": 1, "pos": 0, "n": 3, "draft": 5},
    ],
)
def test_bad_drafts_are_frame_errors(step):
    with pytest.raises(FrameError, match="draft"):
        parse_steps({"steps": [step]})


def test_request_field_and_config_validation(tmp_path):
    req = parse_completion({"prompt": "x", "speculative": {"method": "off"}}, 100)
    assert req.speculative == {"method": "off"}
    req = parse_completion({"prompt": "x", "speculative": {"max_tokens": 3}}, 100)
    assert req.speculative == {"max_tokens": 3}
    for bad in ({"method": "draft"}, {"max_tokens": 0}, {"max_tokens": MAX_DRAFT + 1}, {"n_max": 3}, "ngram"):
        with pytest.raises(RequestError):
            parse_completion({"prompt": "x", "speculative": bad}, 100)
    for bad in ({"method": "eagle"}, {"max_tokens": 63}, {"ngram_min": 3, "ngram_max": 2}, {"min_acceptance": 2}):
        with pytest.raises(ConfigError, match="speculative"):
            load_config(CoordinatorConfig, overrides={"stages": [["http://a"]], "speculative": bad}, env={})
