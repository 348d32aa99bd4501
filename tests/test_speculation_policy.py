"""The speculation policy (``coordinator/speculation.py``), the draft on the wire and the request field, on made-up
sequences: no stage, no model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from chatloop.config import ConfigError, CoordinatorConfig, SpeculativeConfig, load_config
from chatloop.coordinator.api_schema import RequestError, parse_completion
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.sequence import Sequence
from chatloop.coordinator.speculation import PRIOR_ROW_SHARE, Speculator, StepCost
from chatloop.coordinator.step_plan import PlannedStep
from chatloop.engine.slots import count_passes
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


def attach(spec: Speculator, plan: list[PlannedStep]) -> list[PlannedStep]:
    return asyncio.run(spec.attach(plan))


def speculator(fixed: float = 0.040, per_row: float = 0.001, **kw) -> Speculator:
    """A speculator whose step-cost fit has seen decode steps costing ``fixed + per_row x rows`` seconds."""
    spec = Speculator(SpeculativeConfig(**{"method": "ngram", **kw}), CoordinatorMetrics("m"))
    for i in range(40):
        proposed = i % 4
        spec.cost.observe(1, proposed, fixed + per_row * (1 + proposed))
    return spec


def test_step_cost_fit():
    cost = StepCost()
    assert cost.per_row() == 0.0
    cost.observe(1, 0, 0.012)
    assert cost.per_row() == pytest.approx(PRIOR_ROW_SHARE * 0.012)  # no proposals seen yet: the prior
    # Steps slow down with the number of sequences (others' load comes with them) far more than with proposals:
    # the cost of a proposed row is told apart.
    for i in range(80):
        seqs, proposed = 1 + i % 5, (i // 5) % 4
        cost.observe(seqs, proposed, 0.010 + 0.020 * seqs + 0.003 * proposed)
    assert cost.per_row() == pytest.approx(0.003, rel=0.2)
    assert cost.time(2, 4) == pytest.approx(0.062, rel=0.1)


def test_no_proposals_before_a_step_was_measured():
    spec = Speculator(SpeculativeConfig(method="ngram"), CoordinatorMetrics("m"))
    assert attach(spec, [decode(seq())])[0].draft == ()
    spec.observe_step([decode(seq())], 0.02)
    assert spec.cost.per_row() == pytest.approx(PRIOR_ROW_SHARE * 0.02)
    assert attach(spec, [decode(seq())])[0].draft != ()


def test_cheap_rows_buy_long_drafts_expensive_rows_short_ones():
    (p,) = attach(speculator(fixed=0.040, per_row=0.001, max_tokens=8), [decode(seq())])
    # A fresh sequence (acceptance 1/2) over slow links: three proposals beat the step's tokens per second by the
    # margin (GAIN_MARGIN); the fourth, 1/16 of a token for a row the fit prices at 1.4 ms (44 tokens/s), does not
    # beat 1.2 x the step's 42 tokens/s with three (1 + 7/8 tokens in 44.7 ms).
    assert p.draft == (12, 13, 14)
    assert p.rows == 4
    assert p.token_ids().tolist() == [11, 12, 13, 14]
    (p,) = attach(speculator(fixed=0.010, per_row=0.005, max_tokens=8), [decode(seq())])
    assert p.draft == (12,)


def test_acceptance_steers_the_length():
    spec = speculator(fixed=0.020, per_row=0.004, max_tokens=8)
    good, bad = seq(), seq()
    for _ in range(6):
        plan = attach(spec, [decode(good), decode(bad)])
        for p in plan:
            if p.draft:
                spec.record(p, len(p.draft) if p.seq is good else 0)
    drafts = [p.draft for p in attach(spec, [decode(good), decode(bad)])]
    assert len(drafts[0]) >= 4 and drafts[1] == ()
    assert good.speculation.rate > 0.8 and bad.speculation.rate < 0.5
    view = spec.view()
    assert view["accepted_tokens"] == good.speculation.accepted > 0
    assert view["proposed_tokens"] == good.speculation.proposed + bad.speculation.proposed
    assert view["sources"]["ngram"]["verify_steps"] > 0


def test_a_failing_sequence_stops_and_is_retried_later():
    spec = speculator(fixed=0.010, per_row=0.005)
    s = seq()
    for _ in range(5):
        (p,) = attach(spec, [decode(s)])
        if p.draft:
            spec.record(p, 0)
    assert attach(spec, [decode(s)])[0].draft == ()
    for _ in range(200):
        if attach(spec, [decode(s)])[0].draft:
            break
    else:
        raise AssertionError("never retried")


def test_many_concurrent_sequences_leave_no_proposal_worth_its_row():
    # A compute-bound stage: a row costs half of what the rest of a one-row step costs.
    spec = speculator(fixed=0.010, per_row=0.005, max_tokens=8)
    members = [seq() for _ in range(16)]
    assert all(not p.draft for p in attach(spec, [decode(s) for s in members]))
    assert attach(spec, [decode(members[0])])[0].draft  # alone, it pays


def test_min_tokens_go_in_whatever_they_cost():
    """speculative.min_tokens (llama.cpp's --draft-min): that many proposals where the source has them, even where
    the policy would give none; never more than max_tokens or than the source found."""
    members = [seq() for _ in range(16)]
    assert [
        len(p.draft) for p in attach(speculator(fixed=0.010, per_row=0.005, min_tokens=3), [decode(s) for s in members])
    ] == [3] * 16
    (p,) = attach(speculator(fixed=0.010, per_row=0.005, max_tokens=2, min_tokens=5), [decode(seq())])
    assert p.draft == (12, 13)
    (p,) = attach(
        speculator(fixed=0.010, per_row=0.005, min_tokens=5), [decode(seq(tokens=[1, 2, 3, 4], generated=(5, 6, 5, 6)))]
    )
    assert p.draft == (5, 6)  # all that prompt lookup found


def test_rows_that_delay_other_micro_batches_must_pay_for_them_too():
    spec = speculator(fixed=0.040, per_row=0.001, max_tokens=8)
    alone = asyncio.run(spec.attach([decode(seq())], in_flight=1))[0]
    shared = asyncio.run(spec.attach([decode(seq())], in_flight=3))[0]
    crowded = asyncio.run(spec.attach([decode(seq())], in_flight=40))[0]
    assert len(alone.draft) > len(shared.draft) > len(crowded.draft) == 0


def test_no_proposals_past_max_tokens_or_for_prompt_chunks():
    spec = speculator(max_tokens=8)
    (p,) = attach(spec, [decode(seq(max_tokens=4))])  # two generated: room for one more after the step's own
    assert p.draft == (12,)
    s2 = seq()
    chunk = PlannedStep(s2, 0, len(s2.tokens), True)
    assert attach(spec, [chunk]) == [chunk]


def test_off_by_config_and_by_request():
    assert attach(speculator(method="off"), [decode(seq())])[0].draft == ()
    on = seq(speculative=SpeculativeConfig(method="ngram", max_tokens=2))
    off = seq(speculative=SpeculativeConfig(method="off"))
    drafts = [p.draft for p in attach(speculator(method="off"), [decode(on), decode(off)])]
    assert drafts == [(12, 13), ()]


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
    req = parse_completion({"prompt": "x", "speculative": {"min_tokens": 0}}, 100)
    assert req.speculative == {"min_tokens": 0}
    bad_requests = ({"method": "eagle"}, {"max_tokens": 0}, {"max_tokens": MAX_DRAFT + 1}, {"n_max": 3}, "ngram")
    for bad in (*bad_requests, {"min_tokens": -1}, {"min_tokens": 2.5}, {"min_tokens": "2"}):
        with pytest.raises(RequestError):
            parse_completion({"prompt": "x", "speculative": bad}, 100)
    bad_configs = ({"method": "eagle"}, {"max_tokens": 63}, {"ngram_min": 3, "ngram_max": 2}, {"method": "draft"})
    for bad in (*bad_configs, {"min_tokens": -1}, {"min_tokens": MAX_DRAFT + 1}):
        with pytest.raises(ConfigError, match="speculative"):
            load_config(CoordinatorConfig, overrides={"stages": [["http://a"]], "speculative": bad}, env={})


def test_no_proposals_through_a_stage_that_does_not_take_drafts():
    class Rep:
        def __init__(self, features):
            self.info = {"features": features} if features is not None else {}

    spec = speculator()
    s = seq()
    s.route = [Rep(["draft"]), Rep(None)]  # an older stage: no features in its /v1/info
    assert attach(spec, [decode(s)])[0].draft == ()
    s.route = [Rep(["draft"]), Rep(["draft"])]
    assert attach(spec, [decode(s)])[0].draft != ()


def costly_passes(per_pass: float, fixed: float = 0.040, per_row: float = 0.001) -> Speculator:
    """A speculator whose fit has seen 4-sequence decode steps where an extra pass costs ``per_pass`` seconds."""
    spec = Speculator(SpeculativeConfig(method="ngram", max_tokens=8), CoordinatorMetrics("m"))
    for i in range(120):
        seqs, proposed, extra = 1 + i % 4, (i // 4) % 5, (i // 20) % 3
        spec.cost.observe(seqs, proposed, fixed + 0.002 * seqs + per_row * proposed + per_pass * extra, extra)
    return spec


def test_step_cost_learns_what_an_extra_pass_costs():
    assert costly_passes(0.012).cost.per_pass() == pytest.approx(0.012, rel=0.2)
    assert costly_passes(0.0).cost.per_pass() == pytest.approx(0.0, abs=0.002)
    assert StepCost().per_pass() == 0.0


def test_costly_passes_keep_drafts_even():
    """One sequence copies far better than three others. Where passes are free, it gets the longest draft; where a
    pass over the weights costs much more than a row (a memory-bound stage), a longer draft for it alone would cost
    a pass: the four get drafts of one length instead, though the other three would not be worth rows on their own."""
    lengths = {}
    for per_pass in (0.0, 0.030):
        spec = costly_passes(per_pass)
        members = [seq() for _ in range(4)]
        attach(spec, [decode(s) for s in members])  # creates their speculation state
        members[0].speculation.accepted_w = 20.0  # acceptance about 0.95; the others 0.5
        plan = attach(spec, [decode(s) for s in members])
        lengths[per_pass] = [len(p.draft) for p in plan]
        if per_pass:
            assert count_passes([p.rows for p in plan]) == 1
    assert lengths[0.0][0] > max(lengths[0.0][1:]) > 0
    assert lengths[0.030][0] > 0 and len(set(lengths[0.030])) == 1, lengths
