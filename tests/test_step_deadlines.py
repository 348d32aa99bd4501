"""Adaptive forward-call deadlines (a frozen replica is noticed in seconds) and f16 hidden states on the wire."""

from __future__ import annotations

import numpy as np
import pytest

from chatloop.config import ConfigError, CoordinatorConfig, load_config
from chatloop.coordinator.stage_client import StepDeadlines
from chatloop.protocol.messages import HiddenReply, SeqStep, decode_forward, decode_reply, encode_forward, encode_hidden


def _cfg(**kw) -> CoordinatorConfig:
    return CoordinatorConfig(stages=(("http://x",),), **kw)


def test_deadline_follows_the_replicas_recent_time_within_floor_and_ceiling():
    d = StepDeadlines(_cfg(step_timeout_secs=30.0, step_timeout_floor_secs=2.0, step_timeout_factor=20.0))
    assert d.get("a", "decode") == 30.0  # nothing observed yet: the ceiling
    d.observe("a", "decode", 0.01)
    assert d.get("a", "decode") == 2.0  # 20 x 10 ms is below the floor
    assert d.get("a", "prefill") == 30.0 and d.get("b", "decode") == 30.0  # per replica and kind
    for _ in range(50):
        d.observe("a", "prefill", 0.5)
    assert d.get("a", "prefill") == pytest.approx(10.0)
    for _ in range(50):
        d.observe("a", "prefill", 5.0)
    assert d.get("a", "prefill") == 30.0  # never above step_timeout_secs


def test_wire_dtype_is_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stages: [[http://127.0.0.1:9000]]\nwire_dtype: f8\n")
    with pytest.raises(ConfigError, match="wire_dtype"):
        load_config(CoordinatorConfig, path)


def test_f16_hidden_rows_travel_and_are_taken_by_the_next_stage():
    rows = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    reply = decode_reply(encode_hidden(rows, "f16"))
    assert isinstance(reply, HiddenReply) and reply.rows.dtype == np.float16
    assert len(encode_hidden(rows, "f16")) < len(encode_hidden(rows, "f32"))
    frame = encode_forward([SeqStep(1, 0, 3)], reply.rows, want="f16")
    req = decode_forward(frame, first=False, n_embd=8, max_bytes=1 << 20, max_steps=4)
    assert req.data.dtype == np.float32 and req.want == "f16"
    assert float(np.abs(req.data - rows).max()) < 1e-2
