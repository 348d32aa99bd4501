"""A real stage under hostile frames: every bad one gets a 4xx naming the problem, the stage stays healthy,
no sequence leaks, and no bad frame changes another sequence's KV cache (its output stays token-identical)."""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatloop.demo import demo_model_dir
from chatloop.protocol.frames import CONTENT_TYPE, FrameError, decode_frame, encode_frame
from chatloop.protocol.messages import parse_steps, step_to_wire
from tests.cluster_harness import Cluster, http_json

pytestmark = pytest.mark.slow

FRAME_MAX = 1 << 20
PROMPT = [1, 504, 3458, 314, 4649, 314, 28, 253, 2821, 30]  # any in-vocabulary ids
N_DECODE = 12
N_VOCAB = 49152  # SmolLM2
GOOD, DISTURBED, OTHER = 11, 22, 33  # sequence ids


@pytest.fixture(scope="module")
def stages(module_procs, tmp_path_factory):
    extra = {"frame_max_bytes": FRAME_MAX, "max_sequences": 8}
    cluster = Cluster(module_procs, demo_model_dir(2), tmp_path_factory.mktemp("stages"), stage_extra=extra)
    cluster.start_stages()
    return cluster.stage_urls[0][0], cluster.stage_urls[1][0]


@pytest.fixture(scope="module")
def n_embd(stages) -> int:
    return http_json(f"{stages[1]}/v1/info")[1]["n_embd"]


def post(url: str, body: bytes, path: str = "/v1/forward", content_type: str = CONTENT_TYPE):
    """(status, decoded frame or JSON error body)."""
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    if status == 200 and path == "/v1/forward":
        return status, decode_frame(raw)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def frame(steps: list[dict], tensor: np.ndarray | None, **extra) -> bytes:
    return encode_frame({"kind": "forward", "steps": steps, **extra}, tensor)


def tokens(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.int32)


def step_pair(stages, seq: int, pos: int, ids: list[int]) -> int:
    """One step of ``seq`` through both stages; the greedy next token."""
    status, (_, hidden) = post(stages[0], frame([step_to_wire(seq, pos, len(ids))], tokens(*ids)))
    assert status == 200
    status, (header, _) = post(stages[1], frame([step_to_wire(seq, pos, len(ids), sample=True)], hidden))
    assert status == 200, header
    return header["tokens"][0]["token"]


def release(stages, *seqs: int) -> None:
    for url in stages:
        assert post(url, json.dumps({"seqs": list(seqs)}).encode(), "/v1/release", "application/json")[0] == 200


def live(stages) -> list[int]:
    return [http_json(f"{url}/v1/info")[1]["live_sequences"] for url in stages]


def assert_rejected(status: int, body, statuses=(400,), words: str = "") -> None:
    assert status in statuses, body
    err = body["error"]
    assert err["message"] and words.lower() in err["message"].lower(), body


def _prefix(hlen: int, magic: bytes = b"CLWF", version: int = 1) -> bytes:
    return struct.pack("<4sHHI", magic, version, 0, hlen)


def _raw_header(text: str, body: bytes = b"") -> bytes:
    raw = text.encode()
    return _prefix(len(raw)) + raw + body


MALFORMED = {
    "empty": b"",
    "random": bytes(range(256)),
    "bad magic": _prefix(2, magic=b"HTTP") + b"{}",
    "version 9": _prefix(2, version=9) + b"{}",
    "truncated header": _prefix(100) + b'{"kind":',
    "header not JSON": _raw_header("{kind: forward}"),
    "header not object": _raw_header("[1, 2]"),
    "nested header": _raw_header("[" * 50_000 + "]" * 50_000),
    "huge integer": _raw_header('{"kind": "forward", "steps": [{"seq": ' + "9" * 5000 + ', "pos": 0, "n": 1}]}'),
    "dtype a list": _raw_header('{"kind":"forward","dtype":["i32"],"shape":[1],"steps":[]}', b"\0" * 4),
    "shape overflow": _raw_header(
        '{"kind":"forward","dtype":"i32","shape":[2147483647,2147483647,2147483647,2147483647]}'
    ),
    "no kind": encode_frame({"steps": [step_to_wire(OTHER, 0, 1)]}, tokens(5)),
    "wrong kind": encode_frame({"kind": "hidden", "steps": [step_to_wire(OTHER, 0, 1)]}, tokens(5)),
    "no steps": encode_frame({"kind": "forward"}, tokens(5)),
    "no tensor": frame([step_to_wire(OTHER, 0, 1)], None),
    "tensor too short": frame([step_to_wire(OTHER, 0, 1)], tokens(5))[:-1],
    "tensor too long": frame([step_to_wire(OTHER, 0, 1)], tokens(5)) + b"\0",
    "too many steps": frame([step_to_wire(i, 0, 1) for i in range(9)], tokens(*range(9))),
    "duplicate seq": frame([step_to_wire(OTHER, 0, 1), step_to_wire(OTHER, 1, 1)], tokens(5, 6)),
    "negative seq": frame([step_to_wire(-1, 0, 1)], tokens(5)),
    "seq over 63 bits": frame([step_to_wire(1 << 63, 0, 1)], tokens(5)),
    "float pos": frame([{"seq": OTHER, "pos": 0.0, "n": 1}], tokens(5)),
    "zero rows": frame([step_to_wire(OTHER, 0, 0)], tokens(5)),
    "unknown step field": frame([{**step_to_wire(OTHER, 0, 1), "prio": 1}], tokens(5)),
    "bad want": frame([step_to_wire(OTHER, 0, 1)], tokens(5), want="f64"),
    "bad sampling type": frame([step_to_wire(OTHER, 0, 1, sample=True, sampling={"seed": 1.5})], tokens(5)),
    "bad accept": frame([step_to_wire(OTHER, 0, 1, accept=[-4])], tokens(5)),
}


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frames_get_400(stages, name, stage):
    status, body = post(stages[stage], MALFORMED[name])
    assert_rejected(status, body)
    assert body["error"]["code"] == "bad_frame"


def test_oversized_frame_is_refused(stages):
    status, body = post(stages[0], frame([step_to_wire(OTHER, 0, 1)], tokens(5)) + b"\0" * FRAME_MAX)
    assert status == 413, body


def test_wrong_tensor_for_the_stage(stages, n_embd):
    s0, s1 = stages
    one = [step_to_wire(OTHER, 0, 2)]
    assert_rejected(*post(s0, frame(one, np.zeros(2, np.float32))), words="i32 token ids")
    assert_rejected(*post(s0, frame(one, tokens(5))), words="shape")  # 1 token for a 2-row step
    assert_rejected(*post(s0, frame(one, tokens(5, 6, 7))), words="shape")
    assert_rejected(*post(s0, frame(one, tokens(5, N_VOCAB))), words="token ids must be in")
    assert_rejected(*post(s0, frame(one, tokens(-1, 5))), words="token ids must be in")
    assert_rejected(*post(s1, frame(one, tokens(5, 6))), words="hidden rows")
    assert_rejected(*post(s1, frame(one, np.zeros((2, n_embd + 1), np.float32))), words="shape")
    assert_rejected(*post(s1, frame(one, np.zeros((2, 1, n_embd), np.float32))), words="hidden rows")
    assert_rejected(*post(s1, frame(one, np.zeros((3, n_embd), np.float32))), words="shape")
    bias = {"logit_bias": {str(N_VOCAB): 1.0}}
    assert_rejected(*post(s1, frame([{**one[0], "sample": True, "sampling": bias}], np.zeros((2, n_embd), np.float16))))
    assert live(stages) == [0, 0]


def test_position_gaps_and_release_requests(stages):
    s0, _ = stages
    status, body = post(s0, frame([step_to_wire(OTHER, 5, 1)], tokens(5)))
    assert_rejected(status, body, (409,), "position 5")
    assert body["error"]["code"] == "kv_missing"
    for bad in (b"", b"{", b"[]", b'{"seqs": 1}', b'{"seqs": [1.5]}', b'{"seqs": [true]}', b"\xff"):
        assert_rejected(*post(s0, bad, "/v1/release", "application/json"), words="release")
    assert live(stages) == [0, 0]


def _reference(stages) -> list[int]:
    out = [step_pair(stages, GOOD, 0, PROMPT)]
    pos = len(PROMPT)
    for _ in range(N_DECODE - 1):
        out.append(step_pair(stages, GOOD, pos, [out[-1]]))
        pos += 1
    release(stages, GOOD)
    return out


def _garbage(seq: int, pos: int, last: int, n_embd: int) -> list[tuple[int, bytes, bool]]:
    """(stage, frame, may race) triples naming ``seq`` at its current position ``pos``: each must be refused.

    A frame "may race" the sequence's real step when it stays invalid after that step moved the sequence on.
    """
    hidden = np.zeros((1, n_embd), np.float32)
    ok0 = frame([step_to_wire(seq, pos, 1)], tokens(last))
    bias = {"logit_bias": {str(N_VOCAB): 1}}
    return [
        (0, ok0[: len(ok0) // 2], True),
        (0, ok0[:-1], True),
        (0, frame([step_to_wire(seq, pos, 1)], tokens(N_VOCAB + 7)), True),
        (0, frame([step_to_wire(seq, pos, 1)], np.array([float(last)], np.float32)), True),
        (0, frame([step_to_wire(seq, pos, 2)], tokens(last)), True),
        (0, frame([step_to_wire(seq, pos + 3, 1)], tokens(last)), True),
        (0, frame([step_to_wire(seq, pos, 1), step_to_wire(seq, pos, 1)], tokens(last, last)), True),
        (0, frame([step_to_wire(seq, pos, 1), step_to_wire(OTHER, 4, 1)], tokens(last, last)), True),
        (0, frame([step_to_wire(seq, pos, 1), step_to_wire(OTHER, 0, 1)], tokens(last, -5)), True),
        (1, frame([step_to_wire(seq, pos, 1, sample=True)], np.zeros((1, n_embd + 3), np.float32)), True),
        (1, frame([step_to_wire(seq, pos, 1, sample=True, sampling={"seed": 0.5})], hidden), True),
        (1, frame([step_to_wire(seq, pos, 1), step_to_wire(OTHER, 3, 1)], np.zeros((2, n_embd), np.float32)), True),
        # Valid once the real step has run (pos + 1), or a rewind then: not raced.
        (1, frame([step_to_wire(seq, pos + 1, 1, sample=True)], hidden), False),
        (
            1,
            frame(
                [step_to_wire(seq, pos, 1), step_to_wire(OTHER, 0, 1, True, bias)], np.zeros((2, n_embd), np.float32)
            ),
            False,
        ),
    ]


def test_bad_frames_never_change_another_sequence(stages, n_embd):
    reference = _reference(stages)
    got = [step_pair(stages, DISTURBED, 0, PROMPT)]
    pos = len(PROMPT)
    with ThreadPoolExecutor(4) as pool:
        for _ in range(N_DECODE - 1):
            bad = _garbage(DISTURBED, pos, got[-1], n_embd)
            for stage, body, _ in bad:
                status, err = post(stages[stage], body)
                assert status in (400, 409), (stage, status, err)
            # The same garbage racing the sequence's real step, so that some of it shares its decode.
            racing = [pool.submit(post, stages[stage], body) for stage, body, may_race in bad if may_race]
            got.append(step_pair(stages, DISTURBED, pos, [got[-1]]))
            assert all(f.result()[0] in (400, 409) for f in racing)
            pos += 1
    assert got == reference
    release(stages, DISTURBED)
    assert live(stages) == [0, 0]
    assert all(http_json(f"{url}/healthz")[0] == 200 for url in stages)


def test_refused_frame_does_not_rewind_a_sequence(stages, n_embd):
    seq = DISTURBED + 1
    first = step_pair(stages, seq, 0, PROMPT)
    pos = len(PROMPT)
    try:
        bad = frame(
            [
                step_to_wire(seq, pos - 1, 1),  # a replay of the last prompt row: rewinds the sequence by one
                step_to_wire(
                    OTHER, 0, 1, True, {"logit_bias": {str(N_VOCAB): 1}}
                ),  # refused: id outside the vocabulary
            ],
            np.zeros((2, n_embd), np.float32),
        )
        assert post(stages[1], bad)[0] == 400
        status, (_, hidden) = post(stages[0], frame([step_to_wire(seq, pos, 1)], tokens(first)))
        status, body = post(stages[1], frame([step_to_wire(seq, pos, 1, sample=True)], hidden))
        assert status == 200, body
    finally:
        release(stages, seq)


# -- fuzzing over HTTP ---------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
@given(st.data())
def test_mutated_frames_over_http(stages, n_embd, data):
    stage = data.draw(st.sampled_from([0, 1]))
    base = 1000 + data.draw(st.integers(0, 50))
    n = data.draw(st.integers(1, 3))
    if stage == 0:
        good = frame([step_to_wire(base, 0, n)], tokens(*range(5, 5 + n)))
    else:
        good = frame([step_to_wire(base, 0, n, sample=True)], np.zeros((n, n_embd), np.float32))
    buf = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
        at = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if how == "flip" and buf:
            buf[at] ^= data.draw(st.integers(1, 255))
        elif how == "truncate":
            del buf[at:]
        else:
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=6))
    status, body = post(stages[stage], bytes(buf))
    assert status in (200, 400, 409, 413, 503), body
    if status == 200:
        try:
            seqs = [s.seq_id for s in parse_steps(decode_frame(bytes(buf))[0])]
        except FrameError:
            seqs = []
        for url in stages:
            post(url, json.dumps({"seqs": seqs}).encode(), "/v1/release", "application/json")


def test_stage_is_healthy_and_holds_nothing_afterwards(stages):
    for url in stages:
        assert http_json(f"{url}/healthz")[0] == 200
        assert http_json(f"{url}/readyz")[0] == 200
    assert live(stages) == [0, 0]


def test_step_past_the_context_is_a_400_that_names_it(stages):
    """A step that would take a sequence past the context a stage holds per sequence can never succeed:
    400 (not a 503 that invites retries), and the sequence keeps what it had."""
    seq = DISTURBED + 2
    n_ctx_seq = http_json(f"{stages[0]}/v1/info")[1]["n_ctx_seq"]
    try:
        step_pair(stages, seq, 0, PROMPT)
        status, body = post(stages[0], frame([step_to_wire(seq, len(PROMPT), n_ctx_seq)], tokens(*([5] * n_ctx_seq))))
        assert_rejected(status, body, words="position")
        assert live(stages) == [1, 1]
        assert step_pair(stages, seq, len(PROMPT), [5]) >= 0  # the sequence goes on
    finally:
        release(stages, seq)
