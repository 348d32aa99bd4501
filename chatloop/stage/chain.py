"""A stage's part of the chain data plane (docs/design.md, "The chain data plane").

Streams come in on ``GET /v1/stream`` (a WebSocket, cluster token checked here so that a refusal is logged): from
the coordinator (it sends stage 0 its frames and receives results and errors on it) or from a replica of the
previous stage. Each chain frame is checked (format, stage, known coordinator, known next hops, route epoch and
step of every sequence), decoded through the stage's batcher like a forward call, then:

- on the last stage: a result frame (sampled tokens) goes back to the coordinator that sent the step; when the
  coordinator granted it a ring (a grant frame on its own stream, ``ChainGrant``), the sampled tokens first go on to
  the sequences' stage-0 replicas as the next decode step, and so on step after step until the grant's last step id
  or until the coordinator revokes the sequences (docs/design.md, "Ring steps");
- elsewhere: the rows are split by the replica of the next stage each sequence is routed to, and each group goes
  to that replica's stream. Next hops are replica ids that the coordinator registered with ``POST /v1/peers``
  (cluster token; the last stage's next hops are stage 0's replicas), never addresses taken from a frame: no stage
  can be made a proxy to another host.

Whatever fails (a refusal, a decode failure, a next hop that cannot be reached) is reported to the coordinator at
once as an error frame naming the step, the sequences and the hop; the coordinator's failure policy decides. A
frame that cannot be trusted (malformed, truncated, stale epoch, duplicate step, unknown coordinator) is dropped
with a logged reason, and the stage keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
import numpy as np
from aiohttp import web
from prometheus_client import Counter

from chatloop import step_trace
from chatloop.http_util import error_response, secret_equals
from chatloop.logs import trace_id_var
from chatloop.protocol.chain import (
    UNKNOWN_PEER,
    UNREACHABLE,
    ChainFrame,
    ChainGrant,
    decode_chain,
    decode_grant,
    decode_revoke,
    encode_chain,
    encode_error,
    encode_result,
    peek_header,
    split_parts,
)
from chatloop.protocol.frames import FrameError, brief, decode_frame
from chatloop.protocol.messages import ErrorCode, SeqStep
from chatloop.protocol.streams import (
    COORD_HEADER,
    PEERS_PATH,
    ROLE_HEADER,
    ROLES,
    STREAM_PATH,
    TOKEN_HEADER,
    StreamError,
    StreamLink,
)

if TYPE_CHECKING:
    from chatloop.stage.app import StageState

log = logging.getLogger(__name__)

PEER_CONNECT_TIMEOUT_SECS = 2.0  # opening a stream to a next-stage replica
MAX_PEERS = 256  # replicas of the next stage one coordinator may register
MAX_RINGS = 1024  # rings kept, waiting for their next step (one per micro-batch that decodes; stale ones age out)


class StepGuard:
    """Per sequence, the newest route epoch seen, the last step taken and the position it ended at: a frame of an
    older epoch is stale; in the same epoch, an earlier step, or the same step from before where it ended, is a
    duplicate (the parts of one step come in order, each from where the one before ended: ``split_parts``). Least
    recently stepped sequences are forgotten beyond ``capacity`` (a forgotten one that comes back is a replay, which
    starts a newer epoch anyway)."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[int, tuple[int, int, int]] = OrderedDict()  # seq -> (epoch, step, end position)

    def check(self, steps: list[SeqStep], epochs: list[int], step: int) -> str | None:
        """Why the frame must be dropped (``stale epoch ...`` or ``duplicate step ...``), or None."""
        for s, epoch in zip(steps, epochs):
            known = self._seen.get(s.seq_id)
            if known is None:
                continue
            if epoch < known[0]:
                return f"stale epoch {epoch} for sequence {s.seq_id} (now at epoch {known[0]})"
            if epoch == known[0] and (step < known[1] or (step == known[1] and s.pos < known[2])):
                return f"duplicate step {step} for sequence {s.seq_id} (already took step {known[1]} to {known[2]})"
        return None

    def superseded(self, steps: list[SeqStep], epochs: list[int], step: int) -> bool:
        """A newer epoch or a later step of one of these sequences was taken since this step was (its remaining
        parts must not run: they would rewind what the newer one computed)."""
        for s, epoch in zip(steps, epochs):
            known = self._seen.get(s.seq_id)
            if known is not None and (known[0], known[1]) > (epoch, step):
                return True
        return False

    def take(self, steps: list[SeqStep], epochs: list[int], step: int) -> None:
        for s, epoch in zip(steps, epochs):
            self._seen[s.seq_id] = (epoch, step, s.pos + s.n_tokens)
            self._seen.move_to_end(s.seq_id)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


class ChainNode:
    """The chain state of one stage process: coordinators' streams, registered peers, links to the next stage."""

    def __init__(self, st: StageState, code_of: Callable[[BaseException], ErrorCode]) -> None:
        self.st = st
        self.code_of = code_of  # the ErrorCode of a refusal, as for POST /v1/forward
        self.stage = st.entry.index
        self.n_stages = len(st.manifest.stages)
        self.last = st.runtime.role.last
        self.guard = StepGuard()
        self.coordinators: dict[str, web.WebSocketResponse] = {}
        self.streams: set[web.WebSocketResponse] = set()  # every open incoming stream (coordinators' and peers')
        self.peers: dict[str, dict[int, str]] = {}  # coordinator id -> next-stage replica id -> base URL
        # Last stage: the coordinators' rings (grants), by coordinator and the step after which each goes on.
        self.rings: OrderedDict[tuple[str, int], ChainGrant] = OrderedDict()
        self.links: dict[str, StreamLink] = {}  # base URL -> stream to that replica
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        self.parts = st.metrics.counter(
            "worker_chain_parts", "Parts of long prompt chunks passed on before the rest of their step was computed"
        )
        self.revoked = st.metrics.counter(
            "worker_chain_ring_revokes",
            "Sequences a coordinator took out of this last stage's rings (finished, or waiting for a newcomer)",
        )
        self.dropped = Counter(
            "worker_chain_frames_dropped",
            "Chain frames or streams refused, by reason",
            [*st.metrics.labels, "reason"],
            registry=st.metrics.registry,
        )

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        token = self.st.cfg.security.cluster_token
        self.session = aiohttp.ClientSession(headers={TOKEN_HEADER: token} if token else {})

    async def stop(self) -> None:
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(link.close() for link in self.links.values()), return_exceptions=True)
        for ws in list(self.coordinators.values()):
            await ws.close()
        if self.session is not None:
            await self.session.close()

    async def close_streams(self, app: web.Application | None = None) -> None:
        """Close every stream, incoming and outgoing: at shutdown, before the server waits for its handlers (an open
        stream's handler would hold the exit for the server's whole shutdown timeout)."""
        self.stopping = True
        closing = (ws.close(code=aiohttp.WSCloseCode.GOING_AWAY) for ws in list(self.streams))
        await asyncio.gather(*closing, return_exceptions=True)
        await asyncio.gather(*(link.close() for link in self.links.values()), return_exceptions=True)

    def _drop(self, reason: str, detail: str) -> None:
        self.dropped.labels(**self.st.metrics.labels, reason=reason).inc()
        log.warning("chain: dropped (%s): %s", reason, detail)

    # -- HTTP: peers and streams -----------------------------------------------------------------------------

    async def register_peers(self, request: web.Request) -> web.Response:
        """``POST /v1/peers {"coordinator": id, "peers": {"<replica id>": "http://host:port"}}``: the replicas of the
        next stage this coordinator's frames may name (the cluster token is checked by the app's middleware)."""
        try:
            body = await request.json()
            coord, peers = _parse_peers(body)
        except ValueError as exc:
            self._drop("bad_peers", f"from {request.remote}: {exc}")
            return error_response(400, f"bad peers request: {exc}", code=ErrorCode.BAD_REQUEST.value)
        self.peers[coord] = peers
        log.info("chain: coordinator %s registered %d next-stage peer(s)", coord[:12], len(peers))
        return web.json_response({"stage": self.stage, "peers": len(peers)})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/stream``: a coordinator's or a previous stage's stream of frames."""
        token = self.st.cfg.security.cluster_token
        who = f"{request.remote} ({request.headers.get(ROLE_HEADER, 'no role')})"
        if token and not secret_equals(request.headers.get(TOKEN_HEADER), token):
            self._drop("unauthorized", f"stream from {who} without the cluster token")
            return error_response(401, "missing or wrong cluster token", "authentication_error", "unauthorized")
        role, coord = request.headers.get(ROLE_HEADER), request.headers.get(COORD_HEADER)
        if role not in ROLES or (role == "coordinator" and not (coord and len(coord) <= 64)):
            self._drop("bad_stream", f"stream from {who}: needs {ROLE_HEADER} and, from a coordinator, its id")
            return error_response(400, f"{ROLE_HEADER} must be one of {list(ROLES)}", code=ErrorCode.BAD_FRAME.value)
        ws = web.WebSocketResponse(max_msg_size=self.st.cfg.frame_max_bytes, autoping=True)
        await ws.prepare(request)
        self.streams.add(ws)
        if role == "coordinator":
            assert coord is not None
            self.coordinators[coord] = ws
            log.info("chain: coordinator %s opened a stream from %s", coord[:12], request.remote)
        ended = "ended without a close frame (cut or truncated)"
        try:
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    if step_trace.ENABLED:
                        step_trace.mark("frame_in")
                    self._spawn(self.on_frame(msg.data, who, coord if role == "coordinator" else None))
                elif msg.type == aiohttp.WSMsgType.CLOSE:
                    ended = ""
                    break
                elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    ended = "" if self.stopping else ended
                    break
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    ended = f"broke: {ws.exception()}"
                    break
                else:
                    self._drop("bad_frame", f"stream from {who}: a {msg.type.name} message, frames are binary")
        finally:
            self.streams.discard(ws)
            if role == "coordinator" and self.coordinators.get(coord or "") is ws:
                del self.coordinators[coord or ""]
                for key in [k for k in self.rings if k[0] == coord]:  # its rings end with its stream
                    del self.rings[key]
            if ended:
                self._drop("stream_broken", f"stream from {who} {ended}")
            else:
                log.info("chain: stream from %s closed", who)
            if not ws.closed:
                await ws.close()
        return ws

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("chain: a frame's handling failed: %s: %s", type(exc).__name__, exc, exc_info=exc)

    # -- frames --------------------------------------------------------------------------------------------

    async def on_frame(self, buf: bytes, who: str, coord: str | None = None) -> None:
        """A frame from ``who``'s stream; ``coord``: the id of the coordinator whose own stream it is (None: a
        previous stage's)."""
        st, rt = self.st, self.st.runtime
        header = None
        try:
            header, tensor = decode_frame(buf, st.cfg.frame_max_bytes)
            if header.get("kind") == "chain_grant":
                self._take_grant(decode_grant(header, st.cfg.max_sequences), who, coord)
                return
            if header.get("kind") == "chain_revoke":
                self._revoke(*decode_revoke(header, st.cfg.max_sequences), who, coord)
                return
            if header.get("kind") != "chain":
                raise FrameError(f"expected a chain frame, got kind {brief(header.get('kind'))}")
            frame = decode_chain(
                header,
                tensor,
                first=rt.role.first,
                n_embd=rt.n_embd,
                n_stages=self.n_stages,
                max_steps=st.cfg.max_sequences,
            )
        except FrameError as exc:
            self._drop("bad_frame", f"from {who}: {exc}")
            await self._report_unreadable(header if header is not None else peek_header(buf), str(exc))
            return
        seqs = [s.seq_id for s in frame.steps]
        if frame.stage != self.stage:
            self._drop("wrong_stage", f"from {who}: step {frame.step} is for stage {frame.stage}, this is {self.stage}")
            return
        if frame.coord not in self.coordinators:
            self._drop("unknown_coordinator", f"from {who}: step {frame.step} of coordinator {frame.coord[:12]}")
            return
        if not self.last:
            peers = self.peers.get(frame.coord, {})
            unknown = sorted({route[self.stage + 1] for route in frame.routes} - set(peers))
            if unknown:
                message = f"step {frame.step} names next-stage replica {unknown[0]}, which was never registered here"
                self._drop("unknown_peer", f"from {who}: {message}")
                await self._report(frame, seqs, UNKNOWN_PEER, message, self.stage + 1, unknown[0])
                return
        reason = self.guard.check(frame.steps, frame.epochs, frame.step)
        if reason is not None:
            self._drop("stale" if reason.startswith("stale") else "duplicate", f"from {who}: {reason}")
            return
        self.guard.take(frame.steps, frame.epochs, frame.step)
        if frame.traces:
            trace_id_var.set(frame.traces[0])  # NOTE: this frame's own task: its log lines carry the trace
        if st.draining and any(s not in rt.live_ids() for s in seqs):
            await self._report(frame, seqs, ErrorCode.DRAINING.value, "stage is draining: no new sequences")
            return
        if step_trace.ENABLED:
            step_trace.mark("frame_checked")
        parts = [frame] if self.last else split_parts(frame, st.cfg.batching.prompt_part_rows)
        if len(parts) > 1:
            self.parts.inc(len(parts))
        for k, part in enumerate(parts):  # NOTE: in order, each passed on before the next is computed
            if k and self.guard.superseded(part.steps, part.epochs, part.step):
                self._drop("stale", f"from {who}: the rest of step {part.step} (a newer step or epoch came since)")
                return
            if not await self._forward(part, seqs):
                return

    async def _forward(self, frame: ChainFrame, seqs: list[int]) -> bool:
        """Compute the frame's rows and pass them on (or, on the last stage, reply); False when it failed (and was
        reported)."""
        st = self.st
        try:
            result = await st.batcher.submit(frame.steps, frame.data)
        except Exception as exc:  # noqa: BLE001 - every outcome is reported to the coordinator
            code = self.code_of(exc)
            if code is ErrorCode.DECODE_FAILED:
                log.error("chain: step %d failed: %s: %s", frame.step, type(exc).__name__, exc)
            st.metrics.count(code.value)
            await self._report(frame, seqs, code.value, str(exc) or type(exc).__name__)
            return False
        if step_trace.ENABLED:
            step_trace.mark("result")
        st.metrics.count("ok")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("chain forward of step %d, %d steps (traces %s)", frame.step, len(seqs), ",".join(frame.traces))
        if self.last:
            if not frame.more:  # the coordinator hears of a step once, when all of it went through
                grant = self.rings.pop((frame.coord, frame.step), None)
                went_on = await self._ring_step(frame, result, grant) if grant is not None else []
                next_step = None
                if grant is not None and went_on:
                    next_step = grant.next
                    if grant.next < grant.last:  # NOTE: the ring goes on after the step it just started
                        self._keep_ring(dataclasses.replace(grant, after=grant.next, next=grant.next + 1))
                out = encode_result(frame.step, seqs, result, next_step, went_on)
                await self._to_coordinator(frame.coord, out)
        else:
            await self._pass_on(frame, result)
        if step_trace.ENABLED:
            step_trace.mark("sent")
        return True

    def _take_grant(self, grant: ChainGrant, who: str, coord: str | None) -> None:
        """Keep a coordinator's ring (only from that coordinator's own stream, only on the last stage)."""
        if not self.last or grant.coord != coord:
            self._drop(
                "bad_grant", f"from {who}: a grant is taken from its coordinator's own stream, by the last stage"
            )
            return
        self._keep_ring(grant)

    def _keep_ring(self, grant: ChainGrant) -> None:
        self.rings[(grant.coord, grant.after)] = grant
        while len(self.rings) > MAX_RINGS:
            self.rings.popitem(last=False)

    def _revoke(self, coord: str, seqs: frozenset[int], who: str, stream_coord: str | None) -> None:
        """Stop passing ``seqs`` on in any ring of coordinator ``coord`` (from its own stream only)."""
        if coord != stream_coord:
            self._drop("bad_grant", f"from {who}: a revoke is taken from its coordinator's own stream")
            return
        for key, grant in list(self.rings.items()):
            if key[0] == coord and grant.seqs & seqs:
                self.revoked.inc(len(grant.seqs & seqs))
                left = grant.seqs - seqs
                if left:
                    self.rings[key] = dataclasses.replace(grant, seqs=left)
                else:
                    del self.rings[key]

    async def _ring_step(self, frame: ChainFrame, tokens: list, grant: ChainGrant) -> list[int]:
        """Start step ``grant.next`` at stage 0 with the tokens just sampled for the ring's sequences (one decode
        row each, the next position, same route and epoch), without the coordinator's turn; those that ended
        (an end-of-generation token) stop here. Returns the sequences sent on."""
        by_seq = {t.seq_id: t.token for t in tokens}
        rt = self.st.runtime
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(frame.steps):
            token = by_seq.get(s.seq_id)
            if s.seq_id in grant.seqs and s.sample and not s.draft and token is not None and not rt.is_eog(token):
                groups.setdefault(frame.routes[i][0], []).append(i)
        peers = self.peers.get(frame.coord, {})
        sent: list[int] = []
        for rid, idx in groups.items():
            url = peers.get(rid)
            if url is None:
                continue  # NOTE: registered stage-0 replicas only; the coordinator steps these sequences itself
            raw = []
            for i in idx:
                s, be = frame.steps[i], frame.raw_steps[i].get("block_end")
                raw.append({"seq": s.seq_id, "pos": s.pos + s.n_tokens, "n": 1, "sample": True})
                if be is not None:
                    raw[-1]["block_end"] = be
            ids = np.array([by_seq[frame.steps[i].seq_id] for i in idx], dtype=np.int32)
            out = encode_chain(
                frame.coord,
                grant.next,
                0,
                raw,
                [frame.routes[i] for i in idx],
                [frame.epochs[i] for i in idx],
                ids,
                frame.want,
                frame.traces,
            )
            try:
                await self._link(url).send(out)
            except StreamError as exc:
                log.warning("chain: cannot start ring step %d at stage 0 replica %d: %s", grant.next, rid, exc)
                continue
            sent.extend(frame.steps[i].seq_id for i in idx)
        if step_trace.ENABLED and sent:
            step_trace.mark("ring_sent")
        return sent

    async def _report_unreadable(self, header: dict | None, message: str) -> None:
        """A frame whose header names its coordinator, step and sequences, but that is wrong otherwise: tell that
        coordinator now (a protocol fault of this hop, as for ``POST /v1/forward``) rather than let it wait."""
        steps = header.get("steps") if isinstance(header, dict) else None
        if not isinstance(steps, list) or header.get("coord") not in self.coordinators:
            return
        step = header.get("step")
        seqs = [s.get("seq") for s in steps if isinstance(s, dict)]
        if isinstance(step, int) and seqs and all(isinstance(q, int) for q in seqs):
            out = encode_error(step, seqs, ErrorCode.BAD_FRAME.value, message, self.stage)
            await self._to_coordinator(header["coord"], out)

    async def _pass_on(self, frame: ChainFrame, rows: np.ndarray) -> None:
        """Split the rows by next-stage replica and send each group on its stream."""
        nxt = self.stage + 1
        groups: dict[int, list[int]] = {}
        for i, route in enumerate(frame.routes):
            groups.setdefault(route[nxt], []).append(i)
        if len(groups) == 1:  # NOTE: the usual case, on the hot path: no copies, no tasks
            rid, idx = next(iter(groups.items()))
            await self._send_group(frame, rid, idx, rows)
            return
        offsets = [0]
        for s in frame.steps:
            offsets.append(offsets[-1] + s.n_tokens)
        await asyncio.gather(
            *(
                self._send_group(frame, rid, idx, np.concatenate([rows[offsets[i] : offsets[i + 1]] for i in idx]))
                for rid, idx in groups.items()
            )
        )

    async def _send_group(self, frame: ChainFrame, rid: int, idx: list[int], part: np.ndarray) -> None:
        """The steps ``idx`` of ``frame`` (their rows: ``part``) to replica ``rid`` of the next stage."""
        nxt = self.stage + 1
        whole = len(idx) == len(frame.steps)
        out = encode_chain(
            frame.coord,
            frame.step,
            nxt,
            frame.raw_steps if whole else [frame.raw_steps[i] for i in idx],
            frame.routes if whole else [frame.routes[i] for i in idx],
            frame.epochs if whole else [frame.epochs[i] for i in idx],
            part,
            frame.want,
            frame.traces,
            frame.more,
        )
        url = self.peers.get(frame.coord, {}).get(rid)
        try:
            if url is None:
                raise StreamError(f"replica {rid} of stage {nxt} is no longer registered")
            await self._link(url).send(out)
        except StreamError as exc:
            log.warning("chain: cannot pass step %d on to stage %d replica %d: %s", frame.step, nxt, rid, exc)
            seqs = [frame.steps[i].seq_id for i in idx]
            await self._report(frame, seqs, UNREACHABLE, str(exc), nxt, rid)

    def _link(self, url: str) -> StreamLink:
        link = self.links.get(url)
        if link is None:
            assert self.session is not None
            link = self.links[url] = StreamLink(
                self.session,
                url,
                {ROLE_HEADER: "peer"},
                connect_timeout=PEER_CONNECT_TIMEOUT_SECS,
                max_bytes=self.st.cfg.frame_max_bytes,
            )
        return link

    async def _report(
        self, frame: ChainFrame, seqs: list[int], code: str, message: str, stage: int | None = None, replica=None
    ) -> None:
        where = self.stage if stage is None else stage
        await self._to_coordinator(frame.coord, encode_error(frame.step, seqs, code, message, where, replica))

    async def _to_coordinator(self, coord: str, out: bytes) -> None:
        ws = self.coordinators.get(coord)
        if ws is None or ws.closed:
            log.warning("chain: coordinator %s has no open stream here; a reply is lost", coord[:12])
            return
        try:
            await ws.send_bytes(out)
        except (ConnectionError, RuntimeError) as exc:
            log.warning("chain: reply to coordinator %s lost: %s", coord[:12], exc)


def _parse_peers(body) -> tuple[str, dict[int, str]]:
    if not isinstance(body, dict):
        raise ValueError('body must be {"coordinator": id, "peers": {"<replica id>": "http://host:port"}}')
    coord, peers = body.get("coordinator"), body.get("peers")
    if not isinstance(coord, str) or not 1 <= len(coord) <= 64:
        raise ValueError("coordinator must be the coordinator's id (1-64 characters)")
    if not isinstance(peers, dict) or len(peers) > MAX_PEERS:
        raise ValueError(f"peers must map at most {MAX_PEERS} replica ids to base URLs")
    out = {}
    for rid, url in peers.items():
        if not (isinstance(rid, str) and rid.isascii() and rid.isdigit() and len(rid) <= 5):
            raise ValueError(f"peer id {brief(rid)} is not a replica id")
        parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if (
            parsed is None
            or parsed.scheme not in ("http", "https")
            or not parsed.hostname
            or parsed.path not in ("", "/")
        ):
            raise ValueError(f"peer {rid}: {brief(url)} is not a base URL like http://host:port")
        out[int(rid)] = url.rstrip("/")
    return coord, out


def add_chain_routes(app: web.Application, st: StageState, code_of: Callable[[BaseException], ErrorCode]) -> None:
    node = ChainNode(st, code_of)

    async def lifecycle(app: web.Application):
        await node.start()
        yield
        await node.stop()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(node.close_streams)
    app.router.add_get(STREAM_PATH, node.stream)
    app.router.add_post(PEERS_PATH, node.register_peers)
