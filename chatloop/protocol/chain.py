"""The frames of the chain data plane (``topology: chain``, docs/design.md "The chain data plane").

Every frame is a ``frames.py`` frame sent as one binary message on a persistent stream (``protocol/streams.py``):

- chain (coordinator → stage 0, stage K → stage K+1): the ``steps`` of a forward frame and their rows, plus
  ``coord`` (the coordinator's id: where results and errors go), ``step`` (the coordinator's step id, increasing),
  ``stage`` (the stage it is for), per step ``route`` (a replica id per stage: which replica of each stage serves
  the sequence; ids, never addresses) and ``epoch`` (the sequence's route epoch: it grows whenever the
  coordinator starts the sequence over, so frames of an older attempt are stale), and ``want`` (dtype of the
  hidden rows between stages); optionally ``traces`` (the W3C trace ids of the step's requests, at most
  ``MAX_TRACES``, for the stages' logs, as the star's ``X-ChatLoop-Traces`` header); ``more`` (true: a part of the
  step's rows, more parts follow: ``split_parts``).
- result (last stage → coordinator): the sequences of one step that went through every stage, with the sampled
  tokens; with ``next`` and ``next_seqs`` when the last stage passed those sequences' tokens straight on to stage 0
  as step ``next`` (a ring step, below).
- grant (coordinator → last stage, on the coordinator's own stream): ``after`` (a step id), ``next`` and ``last``
  (a block of later step ids the coordinator reserved) and ``seqs``: once step ``after`` has sampled, pass the
  sampled tokens of these sequences (those that did not end) on to their stage-0 replicas as decode step ``next``;
  once that one has sampled, as step ``next + 1``; and so on up to step ``last``, without the coordinator's turn
  (docs/design.md, "Ring steps").
- revoke (coordinator → last stage, on its own stream): ``seqs``: stop passing these sequences on.
- error (any stage → coordinator): sequences of a step that a hop refused or could not pass on, the ``ErrorCode``
  (or ``unreachable`` / ``unknown_peer``), and which hop failed: ``stage`` and ``replica`` (None: the stage that
  reports it).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import orjson

from chatloop.protocol.frames import (
    FRAME_PREFIX,
    MAGIC,
    MAX_HEADER_BYTES,
    FrameError,
    brief,
    decode_frame,
    encode_frame,
)
from chatloop.protocol.messages import (
    BLOCK_ROWS,
    HIDDEN_DTYPES,
    MAX_SEQ_ID,
    SampledToken,
    SeqStep,
    encode_tokens_items,
    forward_rows,
    is_int,
    parse_steps,
    sampled_token_from_wire,
)

MAX_REPLICA_ID = 1 << 16
MAX_STAGES = 1 << 10
MAX_STEP_ID = (1 << 63) - 1
MAX_TRACES = 64  # trace ids a frame carries (the first ones of its requests)
TRACE_ID = re.compile(r"[0-9a-f]{32}")  # a W3C trace id, as http_util.parse_traceparent gives it
# Error codes of a chain error frame beyond ``ErrorCode``: the next hop could not be reached, or the frame named a
# next hop the coordinator never registered with this stage.
UNREACHABLE = "unreachable"
UNKNOWN_PEER = "unknown_peer"


@dataclass(frozen=True)
class ChainFrame:
    coord: str
    step: int
    stage: int
    steps: list[SeqStep]
    raw_steps: list[dict]  # the steps as they came (checked), passed on unchanged
    routes: list[list[int]]  # per step, a replica id per stage
    epochs: list[int]  # per step, the sequence's route epoch
    data: np.ndarray  # token ids (stage 0) or float32 hidden rows
    want: str = "f32"
    traces: tuple[str, ...] = ()  # trace ids of the step's requests, for the logs
    more: bool = False  # a part of the step's rows: more parts follow (``split_parts``)


@dataclass(frozen=True)
class ChainResult:
    step: int
    seqs: list[int]  # went through every stage
    tokens: list[SampledToken]
    next: int | None = None  # the ring step the last stage started with the tokens of ``next_seqs`` (a grant's)
    next_seqs: list[int] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class ChainGrant:
    coord: str
    after: int  # once this step has sampled ...
    next: int  # ... start this step at stage 0 with these sequences' tokens, and after it the next id, ...
    last: int  # ... up to this step
    seqs: frozenset[int]


@dataclass(frozen=True)
class ChainError:
    step: int
    seqs: list[int]
    code: str  # an ErrorCode value, UNREACHABLE or UNKNOWN_PEER
    message: str
    stage: int  # the stage of the hop that failed
    replica: int | None  # its replica id; None: the stage that sent this frame


def encode_chain(
    coord: str,
    step: int,
    stage: int,
    raw_steps: list[dict],
    routes: list[list[int]],
    epochs: list[int],
    data: np.ndarray,
    want: str = "f32",
    traces: tuple[str, ...] | list[str] = (),
    more: bool = False,
) -> bytes:
    header: dict = {
        "kind": "chain",
        "coord": coord,
        "step": step,
        "stage": stage,
        "steps": raw_steps,
        "route": routes,
        "epoch": epochs,
    }
    if want != "f32":
        header["want"] = want
    if traces:
        header["traces"] = list(traces[:MAX_TRACES])
    if more:
        header["more"] = True
    if want == "f16" and data.dtype == np.float32:
        data = data.astype(np.float16)
    return encode_frame(header, data)


def decode_chain(header: dict, tensor, *, first: bool, n_embd: int, n_stages: int, max_steps: int) -> ChainFrame:
    """A chain frame's header and tensor (from ``decode_frame``), every field checked; raises ``FrameError``."""
    coord, step, stage = header.get("coord"), header.get("step"), header.get("stage")
    _check_coord(coord, "chain frame")
    if not is_int(step) or not 0 <= step <= MAX_STEP_ID:
        raise FrameError(f"chain frame: step must be a step id, got {brief(step)}")
    if not is_int(stage) or not 0 <= stage < MAX_STAGES:
        raise FrameError(f"chain frame: stage must be a stage index, got {brief(stage)}")
    steps = parse_steps(header, max_steps=max_steps)
    routes, epochs = header.get("route"), header.get("epoch")
    if not isinstance(routes, list) or len(routes) != len(steps):
        raise FrameError("chain frame: route must list one route per step")
    for i, route in enumerate(routes):
        # Replica ids only: a frame never names an address (a stage forwards to registered peers only).
        if (
            not isinstance(route, list)
            or len(route) != n_stages
            or not all(is_int(r) and 0 <= r < MAX_REPLICA_ID for r in route)
        ):
            raise FrameError(f"chain frame: route[{i}] must be {n_stages} replica ids, got {brief(route)}")
    if (
        not isinstance(epochs, list)
        or len(epochs) != len(steps)
        or not all(is_int(e) and 0 <= e <= MAX_STEP_ID for e in epochs)
    ):
        raise FrameError("chain frame: epoch must list one route epoch per step")
    want = header.get("want", "f32")
    if want not in HIDDEN_DTYPES:
        raise FrameError(f"want must be one of {list(HIDDEN_DTYPES)}, got {brief(want)}")
    traces = header.get("traces", [])
    if (
        not isinstance(traces, list)
        or len(traces) > MAX_TRACES
        or not all(isinstance(t, str) and TRACE_ID.fullmatch(t) for t in traces)
    ):
        raise FrameError(f"chain frame: traces must list at most {MAX_TRACES} trace ids (32 lowercase hex digits)")
    more = header.get("more", False)
    if not isinstance(more, bool) or (more and (len(steps) != 1 or steps[0].sample)):
        raise FrameError("chain frame: more must be true or false, and true only for one step that does not sample")
    data = forward_rows(header, tensor, steps, first=first, n_embd=n_embd)
    return ChainFrame(coord, step, stage, steps, header["steps"], routes, epochs, data, want, tuple(traces), more)


def split_parts(frame: ChainFrame, part_rows: int) -> list[ChainFrame]:
    """The frame as parts of at most ``part_rows`` rows, each to be computed and passed on before the next, so that
    the next stage starts on a long prompt chunk while this one still computes it (docs/design.md, "The chain data
    plane"); ``[frame]`` when it is not worth it or not allowed.

    Only a frame of one prompt chunk is split (one step, no proposals), and only inside the sequence's whole
    64-row blocks (below ``block_end``, which the coordinator always sends): parts start and end on block
    boundaries, so every position is computed by the kernel it would be without parts (engine/runtime.py
    ``plan_decodes``). The rows from the last cut on, with the step's sampling, form the last part; a prefix copy
    (``prefix``) goes with the first. ``part_rows``: a multiple of BLOCK_ROWS; 0 = never split."""
    if part_rows <= 0 or len(frame.steps) != 1 or frame.more:
        return [frame]
    step, raw = frame.steps[0], frame.raw_steps[0]
    if step.draft or step.block_end is None:
        return [frame]
    end = step.pos + step.n_tokens
    cuts = list(range(step.pos + part_rows, min(end, step.block_end), part_rows))
    if step.pos % BLOCK_ROWS or not cuts or cuts[-1] >= end:
        return [frame]
    bounds = [step.pos, *cuts, end]
    parts = []
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        last = hi == end
        part_step = dataclasses.replace(step, pos=lo, n_tokens=hi - lo)
        part_raw = {**raw, "pos": lo, "n": hi - lo}
        if k > 0:  # the prefix copy, once, with the first part
            part_step = dataclasses.replace(part_step, prefix_from=None)
            part_raw.pop("prefix", None)
        if not last:  # sampling (and the sampler's settings) with the last part
            part_step = dataclasses.replace(part_step, sample=False, sampling=None, accept=())
            for key in ("sample", "sampling", "accept"):
                part_raw.pop(key, None)
        rows = frame.data[lo - step.pos : hi - step.pos]
        parts.append(dataclasses.replace(frame, steps=[part_step], raw_steps=[part_raw], data=rows, more=not last))
    return parts


def encode_result(
    step: int, seqs: list[int], tokens: list[SampledToken], next_step: int | None = None, next_seqs: list[int] = ()
) -> bytes:
    header = {"kind": "chain_result", "step": step, "seqs": seqs, "tokens": encode_tokens_items(tokens)}
    if next_step is not None:
        header.update(next=next_step, next_seqs=list(next_seqs))
    return encode_frame(header)


def encode_grant(coord: str, after: int, next_step: int, last: int, seqs: list[int]) -> bytes:
    header = {"kind": "chain_grant", "coord": coord, "after": after, "next": next_step, "last": last, "seqs": seqs}
    return encode_frame(header)


def encode_revoke(coord: str, seqs: list[int]) -> bytes:
    return encode_frame({"kind": "chain_revoke", "coord": coord, "seqs": seqs})


def decode_grant(header: dict, max_seqs: int) -> ChainGrant:
    """A grant frame's header (from ``decode_frame``), every field checked; raises ``FrameError``."""
    coord, after, nxt, last = (header.get(k) for k in ("coord", "after", "next", "last"))
    _check_coord(coord, "chain grant")
    if not (is_int(after) and is_int(nxt) and is_int(last) and 0 <= after < nxt <= last <= MAX_STEP_ID):
        raise FrameError(
            f"chain grant: after, next and last must be step ids in that order, got {brief([after, nxt, last])}"
        )
    return ChainGrant(coord, after, nxt, last, _seq_ids(header, "chain grant", max_seqs))


def decode_revoke(header: dict, max_seqs: int) -> tuple[str, frozenset[int]]:
    """A revoke frame's coordinator and sequences; raises ``FrameError``."""
    _check_coord(header.get("coord"), "chain revoke")
    return header["coord"], _seq_ids(header, "chain revoke", max_seqs)


def _check_coord(coord, what: str) -> None:
    if not isinstance(coord, str) or not 1 <= len(coord) <= 64:
        raise FrameError(f"{what}: coord must be a coordinator id, got {brief(coord)}")


def _seq_ids(header: dict, what: str, max_seqs: int) -> frozenset[int]:
    seqs = header.get("seqs")
    if (
        not isinstance(seqs, list)
        or not 1 <= len(seqs) <= max_seqs
        or not all(is_int(q) and 0 <= q <= MAX_SEQ_ID for q in seqs)
    ):
        raise FrameError(f"{what}: seqs must list 1..{max_seqs} sequence ids")
    return frozenset(seqs)


def encode_error(step: int, seqs: list[int], code: str, message: str, stage: int, replica: int | None = None) -> bytes:
    header = {"kind": "chain_error", "step": step, "seqs": seqs, "code": code, "message": message[:500]}
    header.update(stage=stage, replica=replica)
    return encode_frame(header)


def decode_reply(buf: bytes, max_bytes: int = 64 << 20) -> ChainResult | ChainError:
    """A result or error frame sent to the coordinator; raises ``FrameError``."""
    header, _ = decode_frame(buf, max_bytes)
    kind, step, seqs = header.get("kind"), header.get("step"), header.get("seqs")
    if kind not in ("chain_result", "chain_error"):
        raise FrameError(f"unknown chain reply kind {brief(kind)}")
    if not is_int(step) or not isinstance(seqs, list) or not all(is_int(s) and 0 <= s <= MAX_SEQ_ID for s in seqs):
        raise FrameError(f"{kind}: needs an integer step and a list of sequence ids")
    if kind == "chain_result":
        items = header.get("tokens")
        if not isinstance(items, list):
            raise FrameError("chain_result: needs a list of tokens")
        tokens = [sampled_token_from_wire(t, i) for i, t in enumerate(items)]
        nxt, next_seqs = header.get("next"), header.get("next_seqs", [])
        if not (nxt is None or (is_int(nxt) and step < nxt <= MAX_STEP_ID)) or not (
            isinstance(next_seqs, list) and all(is_int(q) for q in next_seqs) and set(next_seqs) <= set(seqs)
        ):
            raise FrameError("chain_result: next must be a later step id, next_seqs some of its seqs")
        return ChainResult(step, seqs, tokens, nxt, next_seqs if nxt is not None else [])
    code, message, stage, replica = (header.get(k) for k in ("code", "message", "stage", "replica"))
    if not isinstance(code, str) or not is_int(stage) or not (replica is None or is_int(replica)):
        raise FrameError("chain_error: needs code, stage and replica")
    return ChainError(step, seqs, code, str(message), stage, replica)


def peek_header(buf: bytes) -> dict | None:
    """The JSON header of a frame that failed to decode (its tensor part may be truncated or wrong), or None: enough
    to tell the sender which step and sequences a refused frame carried."""
    try:
        magic, _, _, hlen = FRAME_PREFIX.unpack_from(buf)
        if magic != MAGIC or hlen > MAX_HEADER_BYTES:
            return None
        header = orjson.loads(bytes(buf[FRAME_PREFIX.size : FRAME_PREFIX.size + hlen]))
    except Exception:  # noqa: BLE001 - any unreadable header: nothing to tell
        return None
    return header if isinstance(header, dict) else None
