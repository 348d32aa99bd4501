"""Property tests of the frame codec: round trips, and no input that can make it fail other than with FrameError."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from chatloop.protocol.frames import DTYPES, MAX_HEADER_BYTES, FrameError, decode_frame, encode_frame
from chatloop.protocol.messages import MAX_SEQ_ID, SAMPLING_TYPES, SeqStep, parse_steps, step_to_wire
from chatloop.protocol.sampling import SamplingParams

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Header integers are 64-bit and floats finite (orjson: bigger integers are refused both ways, below; an infinite
# float would go out as null, and no header value the code sends can be one).
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_scalars = (
    st.none() | st.booleans() | int64 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
headers = st.dictionaries(st.text(max_size=10).filter(lambda k: k not in ("dtype", "shape")), json_values, max_size=5)
tensors = st.sampled_from(sorted(DTYPES)).flatmap(
    lambda name: hnp.arrays(DTYPES[name], hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
)


def _prefix(hlen: int, magic: bytes = b"CLWF", version: int = 1, flags: int = 0) -> bytes:
    return struct.pack("<4sHHI", magic, version, flags, hlen)


def _raw(header: object, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return _prefix(len(raw)) + raw + body


def _decodes_or_frame_error(buf: bytes, max_bytes: int = 64 << 20) -> None:
    try:
        header, tensor = decode_frame(buf, max_bytes)
    except FrameError as exc:
        assert str(exc)
        return
    assert isinstance(header, dict)
    if tensor is None:
        assert "dtype" not in header and "shape" not in header
    else:
        assert tensor.dtype == DTYPES[header["dtype"]] and list(tensor.shape) == header["shape"]


# -- round trips ---------------------------------------------------------------------------------------


@FUZZ
@given(headers, tensors)
def test_round_trip_every_dtype_and_shape(header, tensor):
    got_header, got = decode_frame(encode_frame(header, tensor))
    assert got_header == {**header, "dtype": got_header["dtype"], "shape": list(tensor.shape)}
    assert DTYPES[got_header["dtype"]] == tensor.dtype
    # Bit-exact, NaN payloads included.
    assert got.shape == tensor.shape and got.tobytes() == tensor.tobytes()


@FUZZ
@given(headers)
def test_round_trip_without_tensor(header):
    assert decode_frame(encode_frame({**header, "dtype": "f32", "shape": [3]})) == (header, None)


def test_big_endian_and_strided_tensors_travel_little_endian():
    a = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    _, got = decode_frame(encode_frame({}, a))
    assert got.dtype == np.dtype("<f4") and np.array_equal(got, a)


@pytest.mark.parametrize("tensor", [np.float32(1.0).reshape(()), np.zeros((1,) * 5, np.float32), np.zeros(3, "<f8")])
def test_encode_refuses_what_decode_would_refuse(tensor):
    with pytest.raises(FrameError):
        encode_frame({}, tensor)


# -- hostile input -------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes(buf):
    _decodes_or_frame_error(buf)


@FUZZ
@given(st.binary(max_size=64), st.integers(0, 2**32 - 1), st.integers(0, 3), st.integers(0, 3), st.binary(max_size=64))
def test_valid_looking_prefix_any_rest(header_bytes, hlen, version, flags, body):
    _decodes_or_frame_error(_prefix(hlen, version=version, flags=flags) + header_bytes + body)
    _decodes_or_frame_error(_prefix(len(header_bytes)) + header_bytes + body)


@FUZZ
@given(st.dictionaries(st.sampled_from(["dtype", "shape", "kind", "steps"]), json_values), st.binary(max_size=64))
def test_any_json_header(header, body):
    _decodes_or_frame_error(_raw(header, body))


@FUZZ
@given(
    st.sampled_from(sorted(DTYPES)) | json_values,
    st.lists(st.integers(-5, 2**40), max_size=6) | json_values,
    st.binary(max_size=64),
)
def test_any_dtype_and_shape(dtype, shape, body):
    _decodes_or_frame_error(_raw({"dtype": dtype, "shape": shape}, body))


@FUZZ
@given(headers, tensors, st.data())
def test_mutated_or_truncated_valid_frame(header, tensor, data):
    buf = bytearray(encode_frame(header, tensor))
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    at = data.draw(st.integers(0, len(buf)))
    if how == "truncate":
        mutated = bytes(buf[:at])
    elif how == "insert":
        mutated = bytes(buf[:at] + data.draw(st.binary(min_size=1, max_size=8)) + buf[at:])
    elif how == "delete":
        mutated = bytes(buf[:at] + buf[at + data.draw(st.integers(1, 8)) :])
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] ^= data.draw(st.integers(1, 255))
        mutated = bytes(buf)
    _decodes_or_frame_error(mutated)


def test_truncated_frames_are_frame_errors_at_every_length():
    buf = encode_frame({"kind": "forward", "steps": [step_to_wire(1, 0, 2)]}, np.arange(6, dtype=np.float32))
    for n in range(len(buf)):
        with pytest.raises(FrameError):
            decode_frame(buf[:n])


@pytest.mark.parametrize(
    ("buf", "words"),
    [
        (b"", "truncated"),
        (_prefix(2, magic=b"XXXX") + b"{}", "bad magic"),
        (_prefix(2, version=2) + b"{}", "version 2"),
        (_prefix(2, flags=1) + b"{}", "flags"),
        (_prefix(3) + b"{}", "does not fit"),
        (_prefix(MAX_HEADER_BYTES + 1) + b"{}", "does not fit"),
        (_prefix(2) + b"\xff\xfe", "not JSON"),
        (_prefix(7) + b'{"a":1]', "not JSON"),
        (_prefix(2) + b"[]", "JSON object"),
        (_raw({"a": 1}, b"x"), "unexpected bytes"),
        (_raw({"dtype": "f64", "shape": [1]}, b"\0" * 8), "dtype"),
        (_raw({"dtype": ["f32"], "shape": [1]}, b"\0" * 4), "dtype"),
        (_raw({"dtype": {"f32": 1}, "shape": [1]}, b"\0" * 4), "dtype"),
        (_raw({"dtype": "f32"}, b"\0" * 4), "shape"),
        (_raw({"shape": [1]}, b"\0" * 4), "dtype"),
        (_raw({"dtype": "f32", "shape": []}), "shape"),
        (_raw({"dtype": "f32", "shape": [1, 1, 1, 1, 1]}, b"\0" * 4), "shape"),
        (_raw({"dtype": "f32", "shape": [-1]}), "shape"),
        (_raw({"dtype": "f32", "shape": [True]}, b"\0" * 4), "shape"),
        (_raw({"dtype": "f32", "shape": [1.0]}, b"\0" * 4), "shape"),
        (_raw({"dtype": "f32", "shape": [2**31]}), "shape"),
        (_raw({"dtype": "f32", "shape": [2]}, b"\0" * 4), "needs 8 bytes"),
        # The product overflows 64 bits: it must not wrap around to the length of the body.
        (_raw({"dtype": "i32", "shape": [2**31 - 1, 2**31 - 1, 2**31 - 1, 2**31 - 1]}, b"\0" * 4), "needs"),
        (_raw({"dtype": "i32", "shape": [2**30, 2**30, 2**30, 16]}), "needs"),
    ],
)
def test_malformed_frames_name_the_problem(buf, words):
    with pytest.raises(FrameError, match=words):
        decode_frame(buf)


@pytest.mark.parametrize(
    "header_text",
    [
        "[" * 100_000 + "]" * 100_000,  # deeper than the interpreter's recursion limit
        '{"a": ' + "9" * 5000 + "}",  # longer than Python's integer digit limit
        '{"a": NaN, "b": -Infinity}',  # JSON extensions Python's json accepts, orjson refuses
        '{"a": 18446744073709551616}',  # beyond 64 bits
        '{"a": "\\ud800"}',  # a lone surrogate
    ],
)
def test_pathological_json_headers(header_text):
    raw = header_text.encode()
    _decodes_or_frame_error(_prefix(len(raw)) + raw)


def test_headers_that_cannot_travel_are_refused_when_sent():
    with pytest.raises(FrameError, match="frame header cannot be sent"):
        encode_frame({"step": 2**64})


@pytest.mark.parametrize(
    "value", ["[" * 900 + "]" * 900, json.dumps(["x" * 1000] * 500), json.dumps({"a": "b" * 10**5})]
)
def test_error_messages_stay_short(value):
    for text in ('{"dtype": ' + value + ', "shape": [1]}', '{"dtype": "f32", "shape": ' + value + "}"):
        raw = text.encode()
        with pytest.raises(FrameError) as err:
            decode_frame(_prefix(len(raw)) + raw + b"\0" * 4)
        assert len(str(err.value)) < 600
    with pytest.raises(FrameError) as err:
        parse_steps({"steps": [{"seq": json.loads(value), "pos": 0, "n": 1}]})
    assert len(str(err.value)) < 600


def test_size_limits():
    frame = encode_frame({"kind": "hidden"}, np.zeros((4, 8), np.float32))
    assert decode_frame(frame, max_bytes=len(frame))[1].shape == (4, 8)
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_frame(frame, max_bytes=len(frame) - 1)
    big = b'{"pad": "' + b"x" * MAX_HEADER_BYTES + b'"}'
    with pytest.raises(FrameError, match="header length"):
        decode_frame(_prefix(len(big)) + big)


# -- forward steps -------------------------------------------------------------------------------------

seq_ids = st.integers(0, MAX_SEQ_ID)
samplings = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.floats(0, 2),
        "top_k": st.integers(0, 100),
        "top_p": st.floats(0.01, 1),
        "min_p": st.floats(0, 1),
        "repeat_penalty": st.floats(0.5, 2),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "seed": st.none() | st.integers(0, 2**32 - 1),
        "logit_bias": st.dictionaries(st.integers(0, 50000).map(str), st.floats(-100, 100), max_size=3),
        "n_logprobs": st.integers(0, 20),
        "want_logprobs": st.booleans(),
    },
)


@st.composite
def valid_steps(draw):
    ids = draw(st.lists(seq_ids, min_size=1, max_size=6, unique=True))
    out = []
    for seq in ids:
        step = step_to_wire(
            seq,
            draw(st.integers(0, 1 << 24)),
            draw(st.integers(1, 1 << 20)),
            sample=draw(st.booleans()),
            sampling=draw(st.none() | samplings),
            accept=draw(st.lists(st.integers(0, 2**31 - 1), max_size=4)),
        )
        out.append(step)
    return out


@FUZZ
@given(valid_steps())
def test_valid_steps_parse(steps):
    got = parse_steps({"steps": steps})
    assert [(s.seq_id, s.pos, s.n_tokens, s.sample, list(s.accept)) for s in got] == [
        (w["seq"], w["pos"], w["n"], w.get("sample", False), w.get("accept", [])) for w in steps
    ]
    for s, w in zip(got, steps):
        assert isinstance(s, SeqStep)
        assert (s.sampling is None) == (w.get("sampling") is None)


BAD_VALUES = {
    "seq": [-1, MAX_SEQ_ID + 1, 1.0, "1", True, None, [1]],
    "pos": [-1, (1 << 24) + 1, 0.5, "0", False, None, {}],
    "n": [0, -3, (1 << 20) + 1, 1.0, "1", True, None],
    "sample": [1, "yes", None, [], {}],
    "accept": ["1", 1, [1.0], [True], [-1], [2**31], [[1]], {"1": 1}],
    "sampling": [
        1,
        "greedy",
        [],
        True,
        {"temperature": "hot"},
        {"temperature": -1},
        {"temperature": float("nan")},
        {"temperature": 10**400},
        {"top_k": 1.5},
        {"top_k": -1},
        {"top_p": 0},
        {"top_p": [1]},
        {"seed": 1.5},
        {"seed": -1},
        {"seed": 2**32},
        {"seed": "1"},
        {"logit_bias": []},
        {"logit_bias": {"x": 1}},
        {"logit_bias": {"1e400": 1}},
        {"logit_bias": {"-1": 1}},
        {"logit_bias": {"\u00b2": 1}},
        {"logit_bias": {"1": 10**400}},
        {"logit_bias": {"1": float("inf")}},
        {"logit_bias": {"1": "1"}},
        {"n_logprobs": 21},
        {"n_logprobs": True},
        {"want_logprobs": 1},
        {"grammar": 1},
        {"grammar_triggers": "x", "grammar": 'root ::= "a"'},
        {"grammar_triggers": [1], "grammar": 'root ::= "a"'},
        {"grammar_triggers": [""], "grammar": 'root ::= "a"'},
        {"grammar_triggers": ["a"]},
        {"no_such_field": 1},
    ],
}


@FUZZ
@given(valid_steps(), st.data())
def test_every_malformed_field_is_a_frame_error(steps, data):
    i = data.draw(st.integers(0, len(steps) - 1))
    key = data.draw(st.sampled_from(sorted(BAD_VALUES)))
    steps[i][key] = data.draw(st.sampled_from(BAD_VALUES[key]))
    with pytest.raises(FrameError, match=rf"steps\[{i}\]"):
        parse_steps({"steps": steps})


@pytest.mark.parametrize("key", ["seq", "pos", "n"])
def test_missing_required_field(key):
    step = step_to_wire(1, 0, 1)
    del step[key]
    with pytest.raises(FrameError, match=key):
        parse_steps({"steps": [step]})


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ({}, "steps must be"),
        ({"steps": None}, "steps must be"),
        ({"steps": []}, "steps must be"),
        ({"steps": {"seq": 1}}, "steps must be"),
        ({"steps": [step_to_wire(i, 0, 1) for i in range(5)]}, "steps must be"),
        ({"steps": [1]}, "must be an object"),
        ({"steps": [{**step_to_wire(1, 0, 1), "extra": 1}]}, "unknown fields"),
        ({"steps": [step_to_wire(7, 0, 1), step_to_wire(7, 1, 1)]}, "appears twice"),
    ],
)
def test_malformed_step_lists(header, words):
    with pytest.raises(FrameError, match=words):
        parse_steps(header, max_steps=4)


@FUZZ
@given(st.dictionaries(st.sampled_from(["steps", "kind"]), json_values | st.lists(json_values, max_size=3)))
def test_any_json_steps(header):
    try:
        steps = parse_steps(header)
    except FrameError:
        return
    assert all(isinstance(s, SeqStep) for s in steps)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(SAMPLING_TYPES)) | st.text(max_size=5), json_values, max_size=4))
def test_any_sampling_object(sampling):
    try:
        (step,) = parse_steps({"steps": [step_to_wire(1, 0, 1, sampling=sampling)]})
    except FrameError:
        return
    assert isinstance(step.sampling, SamplingParams)


def test_sampling_types_cover_every_sampling_field():
    """A new SamplingParams field must get a wire type check (a wrong type would fail inside the decode thread)."""
    assert set(SAMPLING_TYPES) == {f.name for f in dataclasses.fields(SamplingParams)}


def test_sampling_round_trip():
    params = SamplingParams(temperature=0.7, top_k=40, seed=3, logit_bias={5: -2.0}, n_logprobs=2, want_logprobs=True)
    (step,) = parse_steps({"steps": [step_to_wire(1, 0, 1, sample=True, sampling=params.to_wire())]})
    assert step.sampling == params
    lazy = SamplingParams(grammar='root ::= "<tool_call>" [a-z]+', grammar_triggers=(r"[\s\S]*?(<tool_call>)",))
    (step,) = parse_steps({"steps": [step_to_wire(1, 0, 1, sample=True, sampling=lazy.to_wire())]})
    assert step.sampling == lazy and "grammar_triggers" not in SamplingParams().to_wire()


def test_chain_frames_carry_trace_ids_and_refuse_anything_else():
    from chatloop.protocol.chain import MAX_TRACES, decode_chain, encode_chain  # noqa: PLC0415

    steps, tokens = [{"seq": 1, "pos": 0, "n": 2}], np.array([5, 6], dtype=np.int32)
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"

    def decoded(frame: bytes):
        header, tensor = decode_frame(frame)
        return decode_chain(header, tensor, first=True, n_embd=8, n_stages=2, max_steps=4)

    frame = decoded(encode_chain("c0", 1, 0, steps, [[0, 0]], [1], tokens, "f32", [trace] * (MAX_TRACES + 5)))
    assert frame.traces == (trace,) * MAX_TRACES
    assert decoded(encode_chain("c0", 1, 0, steps, [[0, 0]], [1], tokens)).traces == ()
    for bad in (["x" * 32], [trace.upper()], [trace[:-1]], [7], "abc", [trace] * (MAX_TRACES + 1)):
        header, tensor = decode_frame(encode_chain("c0", 1, 0, steps, [[0, 0]], [1], tokens))
        header["traces"] = bad
        with pytest.raises(FrameError, match="traces"):
            decode_chain(header, tensor, first=True, n_embd=8, n_stages=2, max_steps=4)
