"""The chain data plane in one process (docs/design.md, "The chain data plane"): real stage apps of a tiny llama on
aiohttp test servers, the coordinator's ``ChainPipeline`` against the star's ``Pipeline``, and what a stage refuses
on its streams: no cluster token, an unknown next hop, a stale epoch, a duplicate step, a truncated frame, peers
that are not base URLs. Each refusal is logged and the stage keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from chatloop.config import CoordinatorConfig, Security, StageConfig
from chatloop.coordinator.chain_pipeline import ChainPipeline
from chatloop.coordinator.cluster import Cluster
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.pipeline import Pipeline
from chatloop.coordinator.sequence import Sequence
from chatloop.coordinator.stage_client import CallFailure
from chatloop.coordinator.step_plan import plan_step
from chatloop.protocol.chain import (
    UNKNOWN_PEER,
    ChainError,
    ChainResult,
    decode_reply,
    encode_chain,
    encode_grant,
    encode_revoke,
)
from chatloop.protocol.frames import CONTENT_TYPE, FrameError, decode_frame, encode_frame
from chatloop.protocol.messages import SeqStep, encode_forward
from chatloop.protocol.sampling import SamplingParams
from chatloop.protocol.streams import COORD_HEADER, PEERS_PATH, ROLE_HEADER, STREAM_PATH, TOKEN_HEADER
from chatloop.stage.app import create_app as create_stage_app
from chatloop.stage.startup import build_state

TOKEN = "chain-test-token"
PROMPTS = [[1, 5, 9, 13, 17, 21, 25], [2, 4, 6, 8], [3, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40], [7]]


@pytest.fixture(scope="module")
def tiny3(stage_dir, tiny_llama_gguf):
    return stage_dir(tiny_llama_gguf, stages=3)


@contextlib.asynccontextmanager
async def stage_servers(model_dir, n: int, token: str | None = TOKEN, max_sequences: int = 8, replicas=None):
    """One stage app per stage file on a test server (``replicas[k]`` of stage k); yields (servers, states)."""
    states = [
        build_state(
            StageConfig(
                weights_path=str(model_dir / f"stage-{k}.gguf"),
                verify_sha256=False,
                max_sequences=max_sequences,
                security=Security(cluster_token=token),
            )
        )
        for k in range(n)
        for _ in range(replicas[k] if replicas else 1)
    ]
    servers = [TestServer(create_stage_app(st)) for st in states]
    try:
        for s in servers:
            await s.start_server()
        yield servers, states
    finally:
        for s in servers:
            await s.close()
        for st in states:
            st.runtime.close()


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def generate(
    pipe, cluster: Cluster, prompts: list[list[int]], n_tokens: int, ring: bool = False, stop_at=None, made=None
) -> list[list[int]]:
    """Greedy tokens of every prompt, all sequences stepping together (the scheduler's loop, minus policy); with
    ``ring``, decode steps are granted to the last stage and taken over as the scheduler does. ``stop_at``: prompt
    index -> tokens after which that sequence ends early (as a stop string would end it). ``made``: a list that gets
    the sequences."""
    seqs = [Sequence(f"r{i}", list(p), n_tokens, SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
    if made is not None:
        made.extend(seqs)
    wanted = [(stop_at or {}).get(i, n_tokens) for i in range(len(seqs))]
    for s in seqs:
        s.route = [None] * len(cluster.stages)
    continued = None
    while any(s.n_generated < w for s, w in zip(seqs, wanted)):
        live = [s for s, w in zip(seqs, wanted) if s.n_generated < w]
        for s in live:
            cluster.ensure_route(s.route)
        plan = plan_step(live, 256)
        grant = frozenset()
        if ring and all(p.sample for p in plan):
            grant = frozenset(p.seq.id for p in plan if p.seq.n_generated + 1 < p.seq.max_tokens)
        outcome = await pipe.run(plan, continued, grant)
        continued = outcome.continued
        assert not outcome.failures, [str(f.error) for f in outcome.failures]
        for p in outcome.completed:
            p.seq.n_cached = p.pos + p.n
        for seq, tok in outcome.sampled.items():
            seq.tokens.append(tok.token)
    if continued is not None:
        pipe.abandon(continued)
    for s in seqs:
        for r in cluster.leave(s.route):
            await cluster.release(r, [s.id])
    return [s.generated for s in seqs]


@contextlib.asynccontextmanager
async def replicated_chain(model_dir):
    """Stage servers of 3 stages, 2 replicas of stages 1 and 2, and a started chain Cluster over them; yields
    (cluster, stage states, n_vocab)."""
    async with stage_servers(model_dir, 3, replicas=[1, 2, 2]) as (servers, states):
        urls = ((base_url(servers[0]),), tuple(map(base_url, servers[1:3])), tuple(map(base_url, servers[3:5])))
        cfg = CoordinatorConfig(stages=urls, topology="chain", security=Security(cluster_token=TOKEN))
        cluster = Cluster(cfg, CoordinatorMetrics("tiny"))
        await cluster.start()
        try:
            yield cluster, states, states[0].manifest.n_vocab
        finally:
            await cluster.close()


@pytest.mark.parametrize("wire", ["f32", "f16"])
def test_chain_steps_equal_the_star(tiny3, wire):
    """Same tokens as the star, also with f16 hidden rows between stages (both round at the same places)."""

    async def main():
        # Two replicas of stages 1 and 2: sequences of one step spread over them, so stage 0 and stage 1 split rows.
        async with replicated_chain(tiny3) as (cluster, states, n_vocab):
            star = await generate(Pipeline(cluster, n_vocab, wire), cluster, PROMPTS, 8)
            chain = ChainPipeline(cluster, n_vocab, wire)
            before = [st.runtime.decode_count for st in states]
            try:
                got = await generate(chain, cluster, PROMPTS, 8)
                spread = [st.runtime.decode_count - b for st, b in zip(states, before)]
                alone = [(await generate(chain, cluster, [p], 8))[0] for p in PROMPTS[:2]]
            finally:
                await chain.close()
            return star, got, alone, spread

    star, chain, alone, decodes = asyncio.run(main())
    assert all(decodes), decodes  # every replica took part in the chain's steps
    assert chain == star
    assert alone == star[:2]


def _ring_steps(cluster: Cluster) -> float:
    return cluster.metrics.ring_steps._value.get()


def test_ring_steps_equal_the_star(tiny3):
    """Decode steps that the last stage starts itself (ring steps) give the star's tokens: sequences on two
    replicas of the last stage go round to stage 0 and are taken over step after step; sequences of different
    lengths finish inside a ring step (the step forgets them); nothing is left in any stage."""

    async def main():
        async with replicated_chain(tiny3) as (cluster, states, n_vocab):
            star = await generate(Pipeline(cluster, n_vocab), cluster, PROMPTS, 12)
            chain = ChainPipeline(cluster, n_vocab)
            went_round = []  # the sequences each ring step the last stage started carried, in order
            take = chain._take_ring_step

            def spy(step, reply, good):
                went_round.append(set(reply.next_seqs))
                take(step, reply, good)

            chain._take_ring_step = spy
            try:
                got = await generate(chain, cluster, PROMPTS, 12, ring=True)
                rings = _ring_steps(cluster)
                short = await generate(chain, cluster, PROMPTS[:1], 5, ring=True)
                both = await generate(chain, cluster, PROMPTS[:2], 9, ring=True)
                went_round.clear()
                # The first sequence ends after 3 tokens (a stop string, say) inside its ring: it is revoked.
                made = []
                early = await generate(chain, cluster, PROMPTS[:2], 14, ring=True, stop_at={0: 3}, made=made)
                went_round = [{s.request_id for s in made if s.id in ids} for ids in went_round]
            finally:
                await chain.close()
            for _ in range(200):  # releases are on their way
                if not any(st.runtime.live_sequences for st in states):
                    break
                await asyncio.sleep(0.05)
            return star, got, rings, short, both, early, went_round, [st.runtime.live_sequences for st in states]

    star, got, rings, short, both, early, went_round, left = asyncio.run(main())
    assert got == star
    assert rings >= 6  # 12 tokens: a prompt step, then decode steps, most of them ring steps
    assert short == [star[0][:5]] and both == [t[:9] for t in star[:2]]
    assert early[0] == star[0][:3] and len(early[1]) == 14
    # The first sequence is revoked at the first ring step taken over without it: it went round for its tokens 2
    # and 3, then once or twice more at most (the step already under way, one more if the revoke comes late), not
    # for the rest of the other sequence's ring (13 steps granted).
    assert sum("r1" in r for r in went_round) >= 10, went_round
    assert 2 <= sum("r0" in r for r in went_round) <= 4, went_round
    assert left == [0] * 5


async def _coordinator_stream(session, url: str, coord: str = "c0ffee", token: str | None = TOKEN):
    headers = {ROLE_HEADER: "coordinator", COORD_HEADER: coord}
    if token:
        headers[TOKEN_HEADER] = token
    return await session.ws_connect(url + STREAM_PATH, headers=headers)


async def _forward_works(session, url: str) -> bool:
    body = encode_forward([SeqStep(999, 0, 2)], np.array([3, 4], dtype=np.int32))
    headers = {"Content-Type": CONTENT_TYPE, TOKEN_HEADER: TOKEN}
    async with session.post(url + "/v1/forward", data=body, headers=headers) as resp:
        return resp.status == 200


def test_stage_refuses_untrusted_streams_and_frames_and_keeps_serving(tiny3, caplog):
    caplog.set_level(logging.WARNING, logger="chatloop.stage.chain")

    async def main():
        async with stage_servers(tiny3, 3) as (servers, states):
            url0, url1 = base_url(servers[0]), base_url(servers[1])
            async with aiohttp.ClientSession() as session:
                # 1. A stream without the cluster token is refused at the handshake.
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await _coordinator_stream(session, url0, token=None)
                assert refused.value.status == 401
                # 2. Peers can be registered only with the token, and only as base URLs.
                body = {"coordinator": "c0ffee", "peers": {"0": url1}}
                async with session.post(url0 + PEERS_PATH, json=body) as resp:
                    assert resp.status == 401
                bad = {"coordinator": "c0ffee", "peers": {"0": "http://evil.example:80/v1/forward?x"}}
                async with session.post(url0 + PEERS_PATH, json=bad, headers={TOKEN_HEADER: TOKEN}) as resp:
                    assert resp.status == 400
                async with session.post(url0 + PEERS_PATH, json=body, headers={TOKEN_HEADER: TOKEN}) as resp:
                    assert resp.status == 200
                ws = await _coordinator_stream(session, url0)
                tokens = np.array([3, 4, 5], dtype=np.int32)
                # 3. A frame whose route names a next-stage replica nobody registered: refused and reported.
                frame = encode_chain("c0ffee", 1, 0, [{"seq": 1, "pos": 0, "n": 3}], [[0, 7, 0]], [1], tokens)
                await ws.send_bytes(frame)
                reply = decode_reply((await ws.receive()).data)
                assert isinstance(reply, ChainError) and reply.code == UNKNOWN_PEER
                assert (reply.stage, reply.replica, reply.seqs) == (1, 7, [1])
                # 3b. Trace ids that are not trace ids (they end up in log lines): refused and reported.
                odd = encode_chain(
                    "c0ffee", 1, 0, [{"seq": 2, "pos": 0, "n": 3}], [[0, 0, 0]], [1], tokens, "f32", ["x" * 32]
                )
                await ws.send_bytes(odd)
                reply = decode_reply((await ws.receive()).data)
                assert isinstance(reply, ChainError) and reply.code == "bad_frame" and "traces" in reply.message
                assert reply.seqs == [2]
                # 4. A truncated frame and a frame of another coordinator: dropped.
                good = encode_chain("c0ffee", 2, 0, [{"seq": 1, "pos": 0, "n": 3}], [[0, 0, 0]], [5], tokens)
                await ws.send_bytes(good[: len(good) - 5])
                other = encode_chain("someone-else", 2, 0, [{"seq": 1, "pos": 0, "n": 3}], [[0, 0, 0]], [5], tokens)
                await ws.send_bytes(other)
                # 5. The good frame goes through stage 0 (stage 1 has no coordinator stream, so it drops it there).
                await ws.send_bytes(good)
                for _ in range(600):
                    if states[0].runtime.live_sequences:
                        break
                    await asyncio.sleep(0.05)
                assert 1 in states[0].runtime.live_ids()
                # 6. The same step again (a duplicate) and an older epoch (stale): dropped before any decode.
                decodes = states[0].runtime.decode_count
                await ws.send_bytes(good)
                stale = encode_chain("c0ffee", 3, 0, [{"seq": 1, "pos": 3, "n": 1}], [[0, 0, 0]], [4], tokens[:1])
                await ws.send_bytes(stale)
                # 6b. Grants: stage 0 is not the last stage; a peer's stream is not the coordinator's own.
                await ws.send_bytes(encode_grant("c0ffee", 5, 6, 9, [1]))
                url2 = base_url(servers[2])
                peer = await session.ws_connect(url2 + STREAM_PATH, headers={ROLE_HEADER: "peer", TOKEN_HEADER: TOKEN})
                await peer.send_bytes(encode_grant("c0ffee", 5, 6, 9, [1]))
                await peer.send_bytes(encode_revoke("c0ffee", [1]))
                await peer.send_bytes(encode_grant("c0ffee", 6, 5, 9, [1]))  # next before after: malformed
                await peer.close()
                # 7. The stage keeps serving, on the stream and over HTTP.
                assert await _forward_works(session, url0)
                assert states[0].runtime.decode_count == decodes + 1  # only the forward call decoded
                await ws.close()
            return states[0].metrics.registry

    registry = asyncio.run(main())
    text = caplog.text
    assert "stream from" in text and "without the cluster token" in text
    assert "never registered" in text
    assert "frame truncated" in text or "needs" in text
    assert "unknown_coordinator" in text
    assert "duplicate step 2" in text
    assert "stale epoch 4" in text
    assert text.count("a grant is taken from its coordinator's own stream") >= 2
    assert "a revoke is taken from its coordinator's own stream" in text
    assert "in that order" in text
    dropped = {
        s.labels["reason"]: s.value
        for m in registry.collect()
        if m.name == "worker_chain_frames_dropped"
        for s in m.samples
        if s.name.endswith("_total")
    }
    for reason in (
        "unauthorized",
        "unknown_peer",
        "bad_frame",
        "unknown_coordinator",
        "duplicate",
        "stale",
        "bad_grant",
    ):
        assert dropped.get(reason, 0) >= 1, (reason, dropped)


def test_a_stream_cut_mid_frame_is_logged_and_the_stage_keeps_serving(tiny3, caplog):
    caplog.set_level(logging.INFO, logger="chatloop.stage.chain")

    async def main():
        async with stage_servers(tiny3, 1 + 0) as (servers, _):
            server = servers[0]
            host, port = server.host, server.port
            # A WebSocket handshake with the token, then part of a binary message's payload, then the socket closes.
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                (
                    f"GET {STREAM_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    f"Sec-WebSocket-Version: 13\r\n{ROLE_HEADER}: peer\r\n{TOKEN_HEADER}: {TOKEN}\r\n\r\n"
                ).encode()
            )
            assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
            mask = b"\x00\x00\x00\x00"
            writer.write(bytes([0x82, 0x80 | 126]) + (1000).to_bytes(2, "big") + mask + b"CLWF" + b"\x00" * 40)
            await writer.drain()
            writer.close()
            async with aiohttp.ClientSession() as session:
                for _ in range(600):
                    if "without a close frame" in caplog.text:
                        break
                    await asyncio.sleep(0.05)
                assert await _forward_works(session, base_url(server))

    asyncio.run(main())
    assert "stream from 127.0.0.1 (peer) ended without a close frame" in caplog.text


def test_replies_decode():
    from chatloop.protocol.chain import encode_error, encode_result
    from chatloop.protocol.messages import SampledToken

    r = decode_reply(encode_result(4, [1, 2], [SampledToken(1, 42, -0.5)]))
    assert isinstance(r, ChainResult) and r.seqs == [1, 2] and r.tokens[0].token == 42
    assert (r.next, r.next_seqs) == (None, [])
    r = decode_reply(encode_result(4, [1, 2], [SampledToken(1, 42), SampledToken(2, 7)], 9, [2]))
    assert (r.next, r.next_seqs) == (9, [2])
    for nxt, went_on in ((4, [2]), (9, [3]), ("9", [2]), (9, "2"), (9, [[2]])):
        with pytest.raises(FrameError, match="next"):
            decode_reply(encode_result(4, [1, 2], [SampledToken(1, 42)], nxt, went_on))
    e = decode_reply(encode_error(4, [2], "capacity", "full", 1, None))
    assert isinstance(e, ChainError) and (e.code, e.stage, e.replica) == ("capacity", 1, None)


async def _one_step(pipe, cluster: Cluster, prompts: list[list[int]]):
    seqs = [Sequence(f"r{i}", list(p), 4, SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
    for s in seqs:
        s.route = [None] * len(cluster.stages)
        cluster.ensure_route(s.route)
    return await pipe.run(plan_step(seqs, 256))


@contextlib.asynccontextmanager
async def chain_cluster(model_dir, n: int, max_sequences: int = 8, **cfg):
    async with stage_servers(model_dir, n, max_sequences=max_sequences) as (servers, states):
        urls = tuple((base_url(s),) for s in servers)
        config = CoordinatorConfig(stages=urls, topology="chain", security=Security(cluster_token=TOKEN), **cfg)
        cluster = Cluster(config, CoordinatorMetrics("tiny"))
        await cluster.start()
        pipe = ChainPipeline(cluster, states[0].manifest.n_vocab)
        try:
            yield pipe, cluster, servers, states
        finally:
            await pipe.close()
            await cluster.close()


def _hang(state) -> asyncio.Event:
    """Make a stage's decodes wait until the returned event is set (a frozen process, as the coordinator sees it)."""
    release = asyncio.Event()
    submit = state.batcher.submit

    async def stuck(steps, data):
        await release.wait()
        return await submit(steps, data)

    state.batcher.submit = stuck
    return release


def test_a_refusal_is_reported_by_the_hop_that_refused(tiny3):
    async def main():
        async with chain_cluster(tiny3, 3, max_sequences=1) as (pipe, cluster, _, _):
            first = await _one_step(pipe, cluster, PROMPTS[:1])  # takes the only sequence slot of every stage
            assert len(first.completed) == 1 and not first.failures
            outcome = await _one_step(pipe, cluster, PROMPTS[1:2])
            return outcome, cluster

    outcome, cluster = asyncio.run(main())
    assert not outcome.completed
    [failure] = outcome.failures
    assert failure.error.failure is CallFailure.BUSY  # capacity: no free sequence slot
    assert failure.stage == 0 and failure.replica is cluster.stages[0][0]


def test_a_stream_that_closes_mid_step_fails_its_sequences_at_once(tiny3):
    async def main():
        async with chain_cluster(tiny3, 3) as (pipe, cluster, servers, states):
            _hang(states[1])
            step = asyncio.ensure_future(_one_step(pipe, cluster, PROMPTS[:2]))
            for _ in range(600):
                if states[0].runtime.decode_count:
                    break
                await asyncio.sleep(0.05)
            # Stage 1 dies with the step inside it: its connections are cut (as the kernel does for a killed process).
            for handler in list(servers[1].runner.server.connections):
                handler.transport.abort()
            return await step, cluster

    outcome, cluster = asyncio.run(main())
    assert not outcome.completed
    assert {f.error.failure for f in outcome.failures} == {CallFailure.CONNECT}  # the close, not a deadline
    assert {f.replica for f in outcome.failures} == {cluster.stages[1][0]}


def test_a_stalled_step_is_attributed_by_probing_the_route(tiny3, monkeypatch):
    async def main(dead_stage: int | None):
        async with chain_cluster(tiny3, 3, step_timeout_secs=0.5) as (pipe, cluster, _, states):
            release = _hang(states[1])
            if dead_stage is not None:
                dead = cluster.stages[dead_stage][0]
                real = pipe._probe

                async def probe(r):
                    return False if r is dead else await real(r)

                monkeypatch.setattr(pipe, "_probe", probe)
            outcome = await _one_step(pipe, cluster, PROMPTS[:2])
            release.set()
            return outcome, cluster

    outcome, cluster = asyncio.run(main(1))
    assert {f.error.failure for f in outcome.failures} == {CallFailure.TIMEOUT}
    assert {f.replica for f in outcome.failures} == {cluster.stages[1][0]}
    # Every replica answers its probe: nobody is blamed, the step is retried (as a busy stage's, bounded).
    outcome, cluster = asyncio.run(main(None))
    assert {f.error.failure for f in outcome.failures} == {CallFailure.BUSY}


def test_step_guard_drops_stale_epochs_and_duplicate_steps():
    from chatloop.stage.chain import StepGuard

    guard = StepGuard(capacity=2)

    def at(*seqs: int, pos: int = 0, n: int = 1) -> list[SeqStep]:
        return [SeqStep(seq_id=q, pos=pos, n_tokens=n) for q in seqs]

    assert guard.check(at(1, 2), [5, 5], 10) is None
    guard.take(at(1, 2), [5, 5], 10)
    assert "duplicate step 10" in guard.check(at(1), [5], 10)
    assert guard.check(at(1), [5], 11) is None  # the next step of the same attempt
    assert "stale epoch 4" in guard.check(at(2), [4], 12)
    assert guard.check(at(2), [6], 3) is None  # a newer epoch (a replay) starts over, whatever its step id
    # The parts of one step: each from where the one before ended; a part seen again is a duplicate.
    guard.take(at(2, pos=0, n=64), [6], 20)
    assert guard.check(at(2, pos=64, n=64), [6], 20) is None
    guard.take(at(2, pos=64, n=64), [6], 20)
    assert "duplicate step 20" in guard.check(at(2, pos=64, n=64), [6], 20)
    assert "duplicate step 20" in guard.check(at(2, pos=0, n=64), [6], 20)
    assert not guard.superseded(at(2, pos=128), [6], 20)  # the step's next part may run ...
    guard.take(at(2, pos=0, n=64), [7], 21)  # ... until a replay (a newer epoch) takes the sequence over
    assert guard.superseded(at(2, pos=128), [6], 20)
    guard.take(at(3), [1], 13)  # beyond capacity: the least recently stepped sequence (1) is forgotten
    assert guard.check(at(1), [0], 1) is None


def test_route_epochs_change_whenever_a_sequence_starts_over():
    from chatloop.coordinator.step_plan import PlannedStep

    cluster = Cluster(CoordinatorConfig(stages=(("http://127.0.0.1:9",),)), CoordinatorMetrics("m"))
    pipe = ChainPipeline(cluster, 100)
    seq = Sequence("r", [1, 2, 3], 4, SamplingParams())
    first = pipe._epoch(PlannedStep(seq, 0, 3, True))
    assert pipe._epoch(PlannedStep(seq, 3, 1, True)) == first  # continues where the last step ended
    retry = pipe._epoch(PlannedStep(seq, 3, 1, True))  # the same step again (it failed): a new attempt
    assert retry > first
    replay = pipe._epoch(PlannedStep(seq, 0, 4, True))  # failover: replayed from position 0
    assert replay > retry
    other = Sequence("q", [1], 4, SamplingParams())
    assert pipe._epoch(PlannedStep(other, 0, 1, True)) > replay


def _chain_frame(steps: list[SeqStep], rows: int, *, more: bool = False):
    import numpy as np

    from chatloop.protocol.chain import decode_chain, encode_chain
    from chatloop.protocol.frames import decode_frame

    data = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    raw = [s.to_wire() for s in steps]
    buf = encode_chain("c" * 8, 7, 1, raw, [[0, 0]] * len(steps), [3] * len(steps), data, more=more)
    header, tensor = decode_frame(buf)
    return decode_chain(header, tensor, first=False, n_embd=4, n_stages=2, max_steps=16)


def test_split_parts_cuts_a_prompt_chunk_on_block_boundaries():
    import numpy as np

    from chatloop.protocol.chain import split_parts
    from chatloop.protocol.sampling import SamplingParams

    step = SeqStep(5, 0, 300, sample=True, sampling=SamplingParams(temperature=0.0), prefix_from=9, block_end=256)
    frame = _chain_frame([step], 300)
    parts = split_parts(frame, 64)
    assert [(p.steps[0].pos, p.steps[0].n_tokens) for p in parts] == [(0, 64), (64, 64), (128, 64), (192, 108)]
    assert [p.more for p in parts] == [True, True, True, False]
    # the prefix copy with the first part only, sampling (and its settings) with the last only, on the wire too
    assert [p.steps[0].prefix_from for p in parts] == [9, None, None, None]
    assert ["prefix" in p.raw_steps[0] for p in parts] == [True, False, False, False]
    assert [p.steps[0].sample for p in parts] == [False, False, False, True]
    assert ["sampling" in p.raw_steps[0] for p in parts] == [False, False, False, True]
    assert all(p.raw_steps[0]["block_end"] == 256 for p in parts)
    assert np.array_equal(np.concatenate([p.data for p in parts]), frame.data)
    assert split_parts(frame, 128)[0].steps[0].n_tokens == 128 and len(split_parts(frame, 128)) == 2
    # nothing to gain or not allowed: whole
    assert split_parts(frame, 0) == [frame]
    for steps, rows in (
        ([SeqStep(5, 0, 100, block_end=64)], 100),  # one block below block_end
        ([SeqStep(5, 10, 300, block_end=256)], 300),  # not on a block boundary
        ([SeqStep(5, 0, 300)], 300),  # no block_end
        ([SeqStep(5, 0, 150, block_end=128), SeqStep(6, 0, 150, block_end=128)], 300),  # two sequences
    ):
        whole = _chain_frame(steps, rows)
        assert split_parts(whole, 64) == [whole]


def test_decode_chain_checks_more():
    from chatloop.protocol.chain import decode_chain
    from chatloop.protocol.frames import FrameError, decode_frame

    assert _chain_frame([SeqStep(5, 0, 64, block_end=128)], 64, more=True).more
    for steps in ([SeqStep(5, 0, 64, sample=True)], [SeqStep(5, 0, 32), SeqStep(6, 0, 32)]):
        with pytest.raises(FrameError, match="more"):
            _chain_frame(steps, 64, more=True)
    frame = _chain_frame([SeqStep(5, 0, 64)], 64)
    from chatloop.protocol.chain import encode_chain

    buf = encode_chain("c" * 8, 7, 1, frame.raw_steps, frame.routes, frame.epochs, frame.data)
    header, tensor = decode_frame(buf)
    header["more"] = "yes"
    with pytest.raises(FrameError, match="more"):
        decode_chain(header, tensor, first=False, n_embd=4, n_stages=2, max_steps=16)


def test_grants_and_revokes_decode_and_refuse_what_is_malformed():
    from chatloop.protocol.chain import decode_grant, decode_revoke

    def grant(header):
        return decode_grant(decode_frame(encode_frame(header))[0], max_seqs=4)

    g = decode_grant(decode_frame(encode_grant("c0", 3, 5, 9, [1, 2]))[0], max_seqs=4)
    assert (g.coord, g.after, g.next, g.last, g.seqs) == ("c0", 3, 5, 9, frozenset({1, 2}))
    assert grant({"coord": "c0", "after": 3, "next": 5, "last": 5, "seqs": [1]}).last == 5  # a ring of one step
    base = {"kind": "chain_grant", "coord": "c0", "after": 3, "next": 5, "last": 9, "seqs": [1]}
    for bad in (
        {"coord": ""},
        {"coord": 7},
        {"after": -1},
        {"next": 3},
        {"next": True},
        {"last": 4},
        {"last": None},
        {"seqs": []},
        {"seqs": [1, 2, 3, 4, 5]},
        {"seqs": [-1]},
        {"seqs": "1"},
    ):
        with pytest.raises(FrameError, match="chain grant"):
            grant({**base, **bad})
    assert decode_revoke(decode_frame(encode_revoke("c0", [7, 8]))[0], max_seqs=4) == ("c0", frozenset({7, 8}))
    for bad in ({"coord": None}, {"seqs": []}, {"seqs": [True]}, {"seqs": None}):
        with pytest.raises(FrameError, match="chain revoke"):
            decode_revoke({"coord": "c0", "seqs": [1], **bad}, max_seqs=4)


def test_a_ring_step_waits_for_every_last_stage_replicas_part():
    """Two last-stage replicas each start their part of a ring step; one part comes back before the other replica's
    result (which starts the second part) arrives. The ring step is not over until both parts are back."""
    from chatloop.coordinator.chain_pipeline import _Ring, _Step
    from chatloop.coordinator.pipeline import StepOutcome
    from chatloop.coordinator.step_plan import PlannedStep
    from chatloop.protocol.chain import encode_result
    from chatloop.protocol.messages import SampledToken

    async def main():
        urls = (("http://127.0.0.1:1",), ("http://127.0.0.1:2", "http://127.0.0.1:3"))
        cfg = CoordinatorConfig(stages=urls, topology="chain")
        cluster = Cluster(cfg, CoordinatorMetrics("tiny"))
        first, (last_a, last_b) = cluster.stages[0][0], cluster.stages[1]
        pipe = ChainPipeline(cluster, 100)
        seqs = [Sequence(f"r{i}", [1, 2, 3], 8, SamplingParams(temperature=0.0)) for i in range(2)]
        seqs[0].route, seqs[1].route = [first, last_a], [first, last_b]
        entries = {s.id: PlannedStep(s, 0, 3, True) for s in seqs}
        loop = asyncio.get_running_loop()
        step = _Step(10, entries, StepOutcome(), loop.create_future(), remaining=set(entries))
        step.ring = _Ring(11, 20, set(entries), {seqs[0].id: last_a, seqs[1].id: last_b})
        step.granted = 11
        pipe._pending[10] = step
        a, b = seqs[0].id, seqs[1].id
        pipe._on_reply(last_a, encode_result(10, [a], [SampledToken(a, 7)], 11, [a]))
        pipe._on_reply(last_a, encode_result(11, [a], [SampledToken(a, 8)], 12, [a]))  # a's part of step 11 is back
        pipe._on_reply(last_b, encode_result(10, [b], [SampledToken(b, 9)], 11, [b]))  # b's part only starts now
        ring = pipe._pending[11]
        assert step.done.done() and ring.remaining == {b} and not ring.done.done()
        pipe._on_reply(last_b, encode_result(11, [b], [SampledToken(b, 5)]))
        assert ring.done.done() and {p.seq.id for p in ring.outcome.completed} == {a, b}

    asyncio.run(main())
