"""Binary frames between the coordinator and the stages.

A frame is a fixed 12-byte prefix, a small JSON header and raw little-endian tensor bytes::

    b"CLWF" | u16 version | u16 flags (0) | u32 header length | header (UTF-8 JSON) | tensor bytes

The header names the tensor's ``dtype`` ("f32", "f16" or "i32") and ``shape``; the tensor bytes must be
exactly ``prod(shape) * itemsize`` long. Hidden states never travel as JSON floats.
"""

from __future__ import annotations

import json
import struct

import numpy as np

MAGIC = b"CLWF"
VERSION = 1
CONTENT_TYPE = "application/x-chatloop-frame"
_PREFIX = struct.Struct("<4sHHI")
MAX_HEADER_BYTES = 1 << 20
DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i32": np.dtype("<i4")}
_NAMES = {v: k for k, v in DTYPES.items()}


class FrameError(ValueError):
    """A frame that is malformed, truncated, too large or of another version."""


def encode_frame(header: dict, tensor: np.ndarray | None = None) -> bytes:
    header = dict(header)
    payload = b""
    if tensor is not None:
        dt = np.dtype(tensor.dtype).newbyteorder("<")
        if dt not in _NAMES:
            raise FrameError(f"cannot send tensors of dtype {tensor.dtype}")
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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header must be a JSON object")
    body = memoryview(buf)[_PREFIX.size + hlen :]
    if "dtype" not in header and "shape" not in header:
        if len(body):
            raise FrameError(f"{len(body)} unexpected bytes after a header without a tensor")
        return header, None
    dt = DTYPES.get(header.get("dtype"))  # type: ignore[arg-type]
    if dt is None:
        raise FrameError(f"unknown tensor dtype {header.get('dtype')!r}; expected one of {sorted(DTYPES)}")
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 4
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 31 for x in shape)
    ):
        raise FrameError(f"bad tensor shape {shape!r}")
    expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if len(body) != expected:
        raise FrameError(f"tensor of shape {shape} {header['dtype']} needs {expected} bytes, frame carries {len(body)}")
    tensor = np.frombuffer(body, dtype=dt).reshape(shape)
    return header, tensor


# -- forward messages ----------------------------------------------------------------------------------

_STEP_KEYS = {"seq", "pos", "n", "sample", "sampling", "accept"}
MAX_SEQ_ID = (1 << 63) - 1


def _int_field(step: dict, key: str, lo: int, hi: int, i: int) -> int:
    v = step.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise FrameError(f"steps[{i}].{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


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
            try:
                sampling = SamplingParams.from_wire(s["sampling"])
            except (TypeError, ValueError) as exc:
                raise FrameError(f"steps[{i}].sampling: {exc}") from None
        accept = s.get("accept") or []
        if not isinstance(accept, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in accept):
            raise FrameError(f"steps[{i}].accept must be a list of token ids")
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
