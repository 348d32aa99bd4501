"""Binary frames between the coordinator and the stages.

A frame is a fixed 12-byte prefix, a small JSON header and raw little-endian tensor bytes::

    b"CLWF" | u16 version | u16 flags (0) | u32 header length | header (UTF-8 JSON) | tensor bytes

The header names the tensor's ``dtype`` ("f32", "f16" or "i32") and ``shape``; the tensor bytes must be
exactly ``prod(shape) * itemsize`` long. Hidden states never travel as JSON floats.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct

import numpy as np

MAGIC = b"CLWF"
VERSION = 1
CONTENT_TYPE = "application/x-chatloop-frame"
_PREFIX = struct.Struct("<4sHHI")
MAX_HEADER_BYTES = 1 << 20
MAX_DIMS = 4
DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i32": np.dtype("<i4")}
_NAMES = {v: k for k, v in DTYPES.items()}
_REPR = reprlib.Repr()  # hostile values in error messages stay short (and shallow)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40
_brief = _REPR.repr


class FrameError(ValueError):
    """A frame that is malformed, truncated, too large or of another version."""


def encode_frame(header: dict, tensor: np.ndarray | None = None) -> bytes:
    header = dict(header)
    payload = b""
    if tensor is not None:
        dt = np.dtype(tensor.dtype).newbyteorder("<")
        if dt not in _NAMES:
            raise FrameError(f"cannot send tensors of dtype {tensor.dtype}")
        if not 1 <= tensor.ndim <= MAX_DIMS:
            raise FrameError(f"cannot send a tensor of {tensor.ndim} dimensions; frames carry 1 to {MAX_DIMS}")
        header["dtype"] = _NAMES[dt]
        header["shape"] = [int(x) for x in tensor.shape]
        payload = np.ascontiguousarray(tensor, dtype=dt).tobytes()
    else:
        header.pop("dtype", None)
        header.pop("shape", None)
    raw = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, 0, len(raw)) + raw + payload


def decode_frame(buf: bytes, max_bytes: int = 64 << 20) -> tuple[dict, np.ndarray | None]:
    """Parse and check a frame; raise ``FrameError`` naming what is wrong."""
    if len(buf) > max_bytes:
        raise FrameError(f"frame of {len(buf)} bytes exceeds the limit of {max_bytes}")
    if len(buf) < _PREFIX.size:
        raise FrameError(f"frame truncated: {len(buf)} bytes, the prefix alone is {_PREFIX.size}")
    magic, version, flags, hlen = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise FrameError("not a ChatLoop frame (bad magic)")
    if version != VERSION:
        raise FrameError(f"frame version {version}, this build speaks {VERSION}")
    if flags != 0:
        raise FrameError(f"unknown frame flags {flags:#x}")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(buf):
        raise FrameError(f"frame header length {hlen} does not fit the frame of {len(buf)} bytes")
    try:
        header = json.loads(buf[_PREFIX.size : _PREFIX.size + hlen])
    except (ValueError, RecursionError) as exc:
        # NOTE: ValueError also covers bad UTF-8 and integers over Python's digit limit; RecursionError
        # deeply nested arrays. Neither may escape as anything but a FrameError.
        raise FrameError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header must be a JSON object")
    body = memoryview(buf)[_PREFIX.size + hlen :]
    if "dtype" not in header and "shape" not in header:
        if len(body):
            raise FrameError(f"{len(body)} unexpected bytes after a header without a tensor")
        return header, None
    dtype = header.get("dtype")
    dt = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dt is None:
        raise FrameError(f"unknown tensor dtype {_brief(dtype)}; expected one of {sorted(DTYPES)}")
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_DIMS
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 31 for x in shape)
    ):
        raise FrameError(f"bad tensor shape {_brief(shape)}")
    expected = math.prod(shape) * dt.itemsize  # Python ints: a crafted shape cannot wrap around
    if len(body) != expected:
        raise FrameError(f"tensor of shape {shape} {header['dtype']} needs {expected} bytes, frame carries {len(body)}")
    tensor = np.frombuffer(body, dtype=dt).reshape(shape)
    return header, tensor


# -- forward messages ----------------------------------------------------------------------------------

_STEP_KEYS = {"seq", "pos", "n", "sample", "sampling", "accept"}
MAX_SEQ_ID = (1 << 63) - 1
MAX_TOKEN_ID = (1 << 31) - 1
MAX_ACCEPT = 1 << 24

# JSON types of the ``sampling`` fields (``SamplingParams.from_wire`` checks ranges and unknown names). A value
# of the wrong type must fail here: inside the decode thread it would fail every call batched with it.
_NUMBER, _INT, _SEED, _BOOL, _BIAS = "a number", "an integer", "an integer or null", "true or false", "an object"
SAMPLING_TYPES = {
    "temperature": _NUMBER,
    "top_k": _INT,
    "top_p": _NUMBER,
    "min_p": _NUMBER,
    "repeat_penalty": _NUMBER,
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "seed": _SEED,
    "logit_bias": _BIAS,
    "n_logprobs": _INT,
    "want_logprobs": _BOOL,
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) and abs(v) < 1 << 53) or (isinstance(v, float) and math.isfinite(v))


def _int_field(step: dict, key: str, lo: int, hi: int, i: int) -> int:
    v = step.get(key)
    if not _is_int(v) or not lo <= v <= hi:
        raise FrameError(f"steps[{i}].{key} must be an integer in [{lo}, {hi}], got {_brief(v)}")
    return v


def _type_ok(kind: str, value) -> bool:
    if kind == _NUMBER:
        return _is_number(value)
    if kind == _INT:
        return _is_int(value) and abs(value) < 1 << 53
    if kind == _SEED:
        return value is None or (_is_int(value) and abs(value) < 1 << 53)
    if kind == _BOOL:
        return isinstance(value, bool)
    return isinstance(value, dict) and all(
        isinstance(t, str) and t.isascii() and t.isdigit() and len(t) <= 10 and _is_number(b) for t, b in value.items()
    )


def _check_sampling(d, i: int) -> None:
    if not isinstance(d, dict):
        raise FrameError(f"steps[{i}].sampling must be an object")
    for key, value in d.items():
        kind = SAMPLING_TYPES.get(key)  # unknown names: from_wire rejects them
        if kind is not None and not _type_ok(kind, value):
            what = "an object of token id strings to numbers" if kind == _BIAS else kind
            raise FrameError(f"steps[{i}].sampling.{key} must be {what}")


def parse_steps(header: dict, max_steps: int = 4096):
    """The ``steps`` of a forward frame as engine ``SeqStep`` objects, every field checked."""
    from chatloop.engine.runtime import SeqStep  # noqa: PLC0415 - keeps the codec importable without llama.cpp
    from chatloop.engine.sampling import SamplingParams  # noqa: PLC0415

    steps = header.get("steps")
    if not isinstance(steps, list) or not 1 <= len(steps) <= max_steps:
        raise FrameError(f"steps must be a list of 1..{max_steps} objects")
    out = []
    seen = set()
    for i, s in enumerate(steps):
        if not isinstance(s, dict):
            raise FrameError(f"steps[{i}] must be an object")
        unknown = set(s) - _STEP_KEYS
        if unknown:
            raise FrameError(f"steps[{i}] has unknown fields {sorted(unknown)}")
        seq = _int_field(s, "seq", 0, MAX_SEQ_ID, i)
        if seq in seen:
            raise FrameError(f"steps[{i}].seq {seq} appears twice")
        seen.add(seq)
        sampling = None
        if s.get("sampling") is not None:
            _check_sampling(s["sampling"], i)
            try:
                sampling = SamplingParams.from_wire(s["sampling"])
            except (TypeError, ValueError, OverflowError) as exc:
                raise FrameError(f"steps[{i}].sampling: {exc}") from None
        accept = s.get("accept")
        accept = [] if accept is None else accept
        if (
            not isinstance(accept, list)
            or len(accept) > MAX_ACCEPT
            or not all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in accept)
        ):
            raise FrameError(f"steps[{i}].accept must be a list of at most {MAX_ACCEPT} token ids")
        sample = s.get("sample", False)
        if not isinstance(sample, bool):
            raise FrameError(f"steps[{i}].sample must be true or false")
        out.append(
            SeqStep(
                seq_id=seq,
                pos=_int_field(s, "pos", 0, 1 << 24, i),
                n_tokens=_int_field(s, "n", 1, 1 << 20, i),
                sample=sample,
                sampling=sampling,
                accept=accept,
            )
        )
    return out


def step_to_wire(
    seq: int, pos: int, n: int, sample: bool = False, sampling: dict | None = None, accept: list[int] | None = None
) -> dict:
    d: dict = {"seq": seq, "pos": pos, "n": n}
    if sample:
        d["sample"] = True
    if sampling is not None:
        d["sampling"] = sampling
    if accept:
        d["accept"] = accept
    return d
