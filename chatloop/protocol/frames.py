"""Binary frames between the coordinator and the stages.

A frame is a fixed 12-byte prefix, a small JSON header and raw little-endian tensor bytes::

    b"CLWF" | u16 version | u16 flags (0) | u32 header length | header (UTF-8 JSON) | tensor bytes

The header names the tensor's ``dtype`` ("f32", "f16" or "i32") and ``shape``; the tensor bytes must be
exactly ``prod(shape) * itemsize`` long. Hidden states never travel as JSON floats.

Headers go through orjson: one C call each way, where the standard library's json runs layers of Python around
its C scanner, which after a decode has flushed the caches costs 30-40 us per header (scripts/README.md, "Session
15"). orjson is also strict: no NaN literals, integers within 64 bits.
"""

from __future__ import annotations

import math
import reprlib
import struct

import numpy as np
import orjson

MAGIC = b"CLWF"
VERSION = 1
CONTENT_TYPE = "application/x-chatloop-frame"
FRAME_PREFIX = struct.Struct("<4sHHI")
MAX_HEADER_BYTES = 1 << 20
MAX_DIMS = 4
DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i32": np.dtype("<i4")}
_NAMES = {v: k for k, v in DTYPES.items()}
_REPR = reprlib.Repr()  # hostile values in error messages stay short (and shallow)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40
brief = _REPR.repr


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
    try:
        raw = orjson.dumps(header)
    except orjson.JSONEncodeError as exc:
        raise FrameError(f"frame header cannot be sent: {exc}") from None
    return FRAME_PREFIX.pack(MAGIC, VERSION, 0, len(raw)) + raw + payload


def decode_frame(buf: bytes, max_bytes: int = 64 << 20) -> tuple[dict, np.ndarray | None]:
    """Parse and check a frame; raise ``FrameError`` naming what is wrong."""
    if len(buf) > max_bytes:
        raise FrameError(f"frame of {len(buf)} bytes exceeds the limit of {max_bytes}")
    if len(buf) < FRAME_PREFIX.size:
        raise FrameError(f"frame truncated: {len(buf)} bytes, the prefix alone is {FRAME_PREFIX.size}")
    magic, version, flags, hlen = FRAME_PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise FrameError("not a ChatLoop frame (bad magic)")
    if version != VERSION:
        raise FrameError(f"frame version {version}, this build speaks {VERSION}")
    if flags != 0:
        raise FrameError(f"unknown frame flags {flags:#x}")
    if hlen > MAX_HEADER_BYTES or FRAME_PREFIX.size + hlen > len(buf):
        raise FrameError(f"frame header length {hlen} does not fit the frame of {len(buf)} bytes")
    try:
        header = orjson.loads(memoryview(buf)[FRAME_PREFIX.size : FRAME_PREFIX.size + hlen])
    except orjson.JSONDecodeError as exc:
        # NOTE: also bad UTF-8, integers beyond 64 bits and nesting deeper than orjson's limit (1024)
        raise FrameError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header must be a JSON object")
    body = memoryview(buf)[FRAME_PREFIX.size + hlen :]
    if "dtype" not in header and "shape" not in header:
        if len(body):
            raise FrameError(f"{len(body)} unexpected bytes after a header without a tensor")
        return header, None
    dtype = header.get("dtype")
    dt = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dt is None:
        raise FrameError(f"unknown tensor dtype {brief(dtype)}; expected one of {sorted(DTYPES)}")
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_DIMS
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 31 for x in shape)
    ):
        raise FrameError(f"bad tensor shape {brief(shape)}")
    expected = math.prod(shape) * dt.itemsize  # Python ints: a crafted shape cannot wrap around
    if len(body) != expected:
        raise FrameError(f"tensor of shape {shape} {header['dtype']} needs {expected} bytes, frame carries {len(body)}")
    tensor = np.frombuffer(body, dtype=dt).reshape(shape)
    return header, tensor
