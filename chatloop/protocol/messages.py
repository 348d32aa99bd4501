"""Every message between the coordinator and a stage, encoded and decoded in one place.

- forward (coordinator → stage): ``steps`` (one ``SeqStep`` per sequence) and the rows of all steps in order:
  int32 token ids ``[n]`` for the first stage, hidden states ``[n, n_embd]`` (f32 or f16) for the others.
- hidden (stage → coordinator): the rows after the stage's last layer, in the order they were sent.
- tokens (last stage → coordinator): one ``SampledToken`` per step that asked for a sample; a step with a
  ``draft`` gets one per verified position, in order (the accepted proposals, then the stage's own token).
- release (coordinator → stage, JSON): free these sequences' KV and samplers.
- error (stage → coordinator, JSON): ``{"error": {"message", "type", "code"}}`` with an ``ErrorCode``.

The types here are plain data: nothing imports llama.cpp, so the coordinator never loads it for the protocol.
See docs/design.md ("The stage protocol").
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass

import numpy as np

from chatloop.protocol.frames import FrameError, brief, decode_frame, encode_frame
from chatloop.protocol.sampling import SamplingParams

MAX_SEQ_ID = (1 << 63) - 1
MAX_TOKEN_ID = (1 << 31) - 1
MAX_ACCEPT = 1 << 24
MAX_POS = 1 << 24
MAX_ROWS = 1 << 20
HIDDEN_DTYPES = ("f32", "f16")
# Prompt positions are computed in blocks of this many rows (engine/runtime.py, plan_decodes): the rows of one
# sequence in one ubatch from which llama.cpp's CPU flash attention switches to its tiled kernel
# (GGML_FA_TILE_Q in ggml-cpu/common.h), which sums in another order than its row kernel.
BLOCK_ROWS = 64
# Most proposed tokens one step may carry for a sequence: with the token before them that is BLOCK_ROWS - 1 rows,
# which the stage computes in one call with the row kernel, as single decode steps are (docs/design.md,
# "Speculative decoding").
MAX_DRAFT = BLOCK_ROWS - 2


class ErrorCode(str, enum.Enum):
    """Why a stage refused a call. The coordinator decides from the code whom the failure counts against."""

    BAD_FRAME = "bad_frame"  # malformed frame or protocol mismatch: the sender (or a version skew) is at fault
    BAD_REQUEST = "bad_request"  # a well-formed step the stage can never serve (past the context, bad sampler)
    KV_MISSING = "kv_missing"  # the stage no longer holds the positions the step builds on (restart, reaping)
    CAPACITY = "capacity"  # no free sequence slot or KV room now
    QUEUE_FULL = "queue_full"  # the stage's queue of calls is full
    CANCELLED = "cancelled"  # the sequence was released while its call waited
    DRAINING = "draining"  # shutting down: no new sequences
    DECODE_FAILED = "decode_failed"  # llama.cpp or the stage itself failed (a server fault)
    UNAUTHORIZED = "unauthorized"  # missing or wrong cluster token


# HTTP status for each code; 503s invite a retry (Retry-After).
ERROR_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.KV_MISSING: 409,
    ErrorCode.CAPACITY: 503,
    ErrorCode.QUEUE_FULL: 503,
    ErrorCode.CANCELLED: 409,
    ErrorCode.DRAINING: 503,
    ErrorCode.DECODE_FAILED: 500,
    ErrorCode.UNAUTHORIZED: 401,
}


@dataclass(frozen=True)
class SeqStep:
    """One sequence's rows in a forward call: ``n_tokens`` rows starting at position ``pos``."""

    seq_id: int  # the coordinator's id for the sequence (any 63-bit integer)
    pos: int  # position of the first row; earlier positions must already be in the stage's KV cache
    n_tokens: int  # rows of this sequence in the call, in order
    sample: bool = False  # last stage: sample the next token after the last row
    sampling: SamplingParams | None = None  # last stage: (re)create the sequence's sampler with these settings
    accept: tuple[int, ...] | list[int] = ()  # last stage: tokens to feed the new sampler's history
    # A sequence new to the stage starts from the first ``pos`` positions of this (cached) sequence's KV.
    prefix_from: int | None = None
    # Positions below this are computed in whole 64-row blocks (the prompt's), the rest row by row; a multiple of
    # 64, fixed for a sequence. None: kept from the sequence's first step (its prompt's whole blocks).
    block_end: int | None = None
    # Speculative decoding: the last ``len(draft)`` rows are proposed tokens (these ids). With ``sample``, the last
    # stage samples after each of the last ``len(draft) + 1`` rows in turn and stops at the first token that differs
    # from the next proposal: it returns the accepted proposals plus its own next token (docs/design.md,
    # "Speculative decoding"). Other stages compute the rows as any others.
    draft: tuple[int, ...] = ()

    def to_wire(self) -> dict:
        return step_to_wire(
            self.seq_id,
            self.pos,
            self.n_tokens,
            sample=self.sample,
            sampling=self.sampling.to_wire() if self.sampling is not None else None,
            accept=list(self.accept) or None,
            prefix_from=self.prefix_from,
            block_end=self.block_end,
            draft=list(self.draft) or None,
        )


@dataclass(frozen=True)
class SampledToken:
    seq_id: int
    token: int
    logprob: float | None = None  # log-probability of ``token`` under the model (before sampling filters)
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely alternatives


@dataclass(frozen=True)
class ForwardRequest:
    steps: list[SeqStep]
    data: np.ndarray  # int32 [n_rows] (first stage) or float32 [n_rows, n_embd]
    want: str = "f32"  # dtype of the hidden rows in the reply

    @property
    def n_rows(self) -> int:
        return sum(s.n_tokens for s in self.steps)


@dataclass(frozen=True)
class HiddenReply:
    rows: np.ndarray  # [n_rows, n_embd] float32 or float16, in the order of the request's rows


@dataclass(frozen=True)
class TokensReply:
    tokens: list[SampledToken]


# -- forward -------------------------------------------------------------------------------------------


def encode_forward(steps: list[SeqStep], data: np.ndarray, want: str = "f32") -> bytes:
    header: dict = {"kind": "forward", "steps": [s.to_wire() for s in steps]}
    if want != "f32":
        header["want"] = want
    return encode_frame(header, data)


def decode_forward(buf: bytes, *, first: bool, n_embd: int, max_bytes: int, max_steps: int) -> ForwardRequest:
    """A forward frame for a stage (``first``: takes token ids); raises ``FrameError`` naming what is wrong."""
    header, tensor = decode_frame(buf, max_bytes)
    if header.get("kind") != "forward":
        raise FrameError(f"expected a forward frame, got kind {brief(header.get('kind'))}")
    steps = parse_steps(header, max_steps=max_steps)
    data = forward_rows(header, tensor, steps, first=first, n_embd=n_embd)
    want = header.get("want", "f32")
    if want not in HIDDEN_DTYPES:
        raise FrameError(f"want must be one of {list(HIDDEN_DTYPES)}, got {brief(want)}")
    return ForwardRequest(steps, data, want)


def forward_rows(header: dict, tensor: np.ndarray | None, steps: list[SeqStep], *, first: bool, n_embd: int):
    """The rows of a frame that carries ``steps`` (forward or chain frame), checked against them: int32 token ids
    for the first stage, f32/f16 hidden rows ``[n, n_embd]`` (returned as float32) for the others."""
    if tensor is None:
        raise FrameError("forward frame carries no tensor")
    n_rows = sum(s.n_tokens for s in steps)
    if first:
        if tensor.dtype != np.dtype("<i4"):
            raise FrameError(f"this stage takes i32 token ids, got {header['dtype']}")
        data = np.ascontiguousarray(tensor, dtype=np.int32).reshape(-1)
        if data.shape != (n_rows,):
            raise FrameError(f"token id shape {list(data.shape)} does not match the {n_rows} rows the steps name")
    else:
        if tensor.ndim != 2 or tensor.dtype.kind != "f":
            raise FrameError(
                f"this stage takes f32/f16 hidden rows [n, {n_embd}], got {header['dtype']} {tensor.shape}"
            )
        if tensor.shape != (n_rows, n_embd):
            raise FrameError(f"hidden rows of shape {list(tensor.shape)} do not match the steps' [{n_rows}, {n_embd}]")
        data = np.ascontiguousarray(tensor, dtype=np.float32)
    return data


# -- replies -------------------------------------------------------------------------------------------


def encode_hidden(rows: np.ndarray, want: str = "f32") -> bytes:
    return encode_frame({"kind": "hidden"}, rows.astype(np.float16) if want == "f16" else rows)


def encode_tokens(tokens: list[SampledToken]) -> bytes:
    return encode_frame({"kind": "tokens", "tokens": encode_tokens_items(tokens)})


def encode_tokens_items(tokens: list[SampledToken]) -> list[dict]:
    """Sampled tokens as the JSON items of a tokens frame (also in the chain's result frames)."""
    return [
        {
            "seq": t.seq_id,
            "token": t.token,
            "logprob": t.logprob,
            "top": [[tok, lp] for tok, lp in t.top_logprobs] if t.top_logprobs is not None else None,
        }
        for t in tokens
    ]


def decode_reply(buf: bytes, max_bytes: int = 64 << 20) -> HiddenReply | TokensReply:
    """A stage's answer to a forward call; raises ``FrameError`` when it is not a well-formed reply."""
    header, tensor = decode_frame(buf, max_bytes)
    kind = header.get("kind")
    if kind == "hidden":
        if tensor is None or tensor.ndim != 2 or tensor.dtype.kind != "f":
            raise FrameError("a hidden reply must carry a 2-D float tensor")
        return HiddenReply(tensor)  # f32 or f16, as the caller asked (``want``); the next stage takes either
    if kind == "tokens":
        items = header.get("tokens")
        if not isinstance(items, list):
            raise FrameError("a tokens reply needs a list of tokens")
        return TokensReply([sampled_token_from_wire(t, i) for i, t in enumerate(items)])
    raise FrameError(f"unknown reply kind {brief(kind)}")


def sampled_token_from_wire(item, i: int) -> SampledToken:
    if not isinstance(item, dict):
        raise FrameError(f"tokens[{i}] must be an object")
    seq, token, logprob, top = item.get("seq"), item.get("token"), item.get("logprob"), item.get("top")
    if not is_int(seq) or not is_int(token) or not 0 <= token <= MAX_TOKEN_ID:
        raise FrameError(f"tokens[{i}] needs integer seq and token")
    if logprob is not None and not _is_number(logprob):
        raise FrameError(f"tokens[{i}].logprob must be a number")
    pairs = None
    if top is not None:
        if not isinstance(top, list) or not all(
            isinstance(p, list) and len(p) == 2 and is_int(p[0]) and _is_number(p[1]) for p in top
        ):
            raise FrameError(f"tokens[{i}].top must be a list of [token, logprob] pairs")
        pairs = [(int(t), float(lp)) for t, lp in top]
    return SampledToken(seq, token, None if logprob is None else float(logprob), pairs)


# -- release and errors (JSON bodies) ------------------------------------------------------------------


def release_body(seq_ids: list[int]) -> dict:
    return {"seqs": list(seq_ids)}


def parse_release(body) -> list[int]:
    seqs = body.get("seqs") if isinstance(body, dict) else None
    if not isinstance(seqs, list) or not all(is_int(s) and 0 <= s <= MAX_SEQ_ID for s in seqs):
        raise ValueError('body must be {"seqs": [sequence ids]}')
    return seqs


def error_body(code: ErrorCode, message: str, err_type: str) -> dict:
    return {"error": {"message": message, "type": err_type, "param": None, "code": code.value}}


def parse_error(payload: bytes) -> tuple[ErrorCode | None, str]:
    """(code, message) of a stage's error body; code None when the body is not one of ours."""
    try:
        err = json.loads(payload)["error"]
        message = str(err.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, payload[:200].decode("utf-8", "replace")
    try:
        return ErrorCode(err.get("code")), message
    except ValueError:
        return None, message


# -- steps ---------------------------------------------------------------------------------------------

_STEP_KEYS = {"seq", "pos", "n", "sample", "sampling", "accept", "prefix", "block_end", "draft"}

# JSON types of the ``sampling`` fields (``SamplingParams.from_wire`` checks ranges and unknown names). A value
# of the wrong type must fail here: inside the decode thread it would fail every call batched with it.
_NUMBER, _INT, _SEED, _BOOL, _BIAS, _TEXT, _TEXTS = (
    "a number",
    "an integer",
    "an integer or null",
    "true or false",
    "an object",
    "a string or null",
    "a list of strings",
)
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
    "grammar": _TEXT,
    "grammar_triggers": _TEXTS,
}


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (is_int(v) and abs(v) < 1 << 53) or (isinstance(v, float) and math.isfinite(v))


def _int_field(step: dict, key: str, lo: int, hi: int, i: int) -> int:
    v = step.get(key)
    if not is_int(v) or not lo <= v <= hi:
        raise FrameError(f"steps[{i}].{key} must be an integer in [{lo}, {hi}], got {brief(v)}")
    return v


def _type_ok(kind: str, value) -> bool:
    if kind == _NUMBER:
        return _is_number(value)
    if kind == _INT:
        return is_int(value) and abs(value) < 1 << 53
    if kind == _SEED:
        return value is None or (is_int(value) and abs(value) < 1 << 53)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _TEXT:
        return value is None or isinstance(value, str)
    if kind == _TEXTS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
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


def _token_ids(s: dict, key: str, limit: int, i: int) -> list[int]:
    """``steps[i][key]``: absent, or a list of at most ``limit`` token ids."""
    ids = s.get(key)
    ids = [] if ids is None else ids
    if not isinstance(ids, list) or len(ids) > limit or not all(is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in ids):
        raise FrameError(f"steps[{i}].{key} must be a list of at most {limit} token ids")
    return ids


def parse_steps(header: dict, max_steps: int = 4096) -> list[SeqStep]:
    """The ``steps`` of a forward frame, every field checked."""
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
        accept = _token_ids(s, "accept", MAX_ACCEPT, i)
        sample = s.get("sample", False)
        if not isinstance(sample, bool):
            raise FrameError(f"steps[{i}].sample must be true or false")
        prefix = _int_field(s, "prefix", 0, MAX_SEQ_ID, i) if s.get("prefix") is not None else None
        block_end = _int_field(s, "block_end", 0, MAX_POS, i) if s.get("block_end") is not None else None
        if block_end is not None and block_end % BLOCK_ROWS:
            raise FrameError(f"steps[{i}].block_end must be a multiple of {BLOCK_ROWS}")
        if prefix == seq:
            raise FrameError(f"steps[{i}].prefix names the sequence itself")
        n_tokens = _int_field(s, "n", 1, MAX_ROWS, i)
        draft = _token_ids(s, "draft", MAX_DRAFT, i)
        if len(draft) >= n_tokens:
            raise FrameError(f"steps[{i}].draft has {len(draft)} proposals for {n_tokens} rows (needs fewer)")
        out.append(
            SeqStep(
                seq_id=seq,
                pos=_int_field(s, "pos", 0, MAX_POS, i),
                n_tokens=n_tokens,
                sample=sample,
                sampling=sampling,
                accept=tuple(accept),
                prefix_from=prefix,
                block_end=block_end,
                draft=tuple(draft),
            )
        )
    return out


def step_to_wire(
    seq: int,
    pos: int,
    n: int,
    sample: bool = False,
    sampling: dict | None = None,
    accept: list[int] | None = None,
    prefix_from: int | None = None,
    block_end: int | None = None,
    draft: list[int] | None = None,
) -> dict:
    d: dict = {"seq": seq, "pos": pos, "n": n}
    if block_end is not None:
        d["block_end"] = block_end
    if prefix_from is not None:
        d["prefix"] = prefix_from
    if sample:
        d["sample"] = True
    if sampling is not None:
        d["sampling"] = sampling
    if accept:
        d["accept"] = accept
    if draft:
        d["draft"] = draft
    return d
