"""Whom a failure counts against (docs/design.md, "The stage protocol" and "Failure handling").

- The engine's thread rule: only the worker thread touches a runtime's sequence table, even while the event loop
  serves /v1/info and /metrics during decodes.
- A stage's own fault inside a decode (any exception, a ValueError included) is a 500 ``decode_failed``, never a
  400 that would blame the caller.
- A stage answering ``bad_frame`` (e.g. a frame-version skew during a rolling upgrade) is a protocol fault of that
  replica: it is marked down and the client gets a 503, not a 400.
- A release a replica does not confirm is retried, then logged as a warning and counted.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from chatloop.config import CoordinatorConfig, StageConfig
from chatloop.coordinator.app import create_app
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.stage_client import CallFailure, StageCallError, StageClient
from chatloop.protocol.frames import CONTENT_TYPE, decode_frame
from chatloop.protocol.messages import ErrorCode, SeqStep, encode_forward, error_body
from chatloop.stage.app import create_app as create_stage_app
from chatloop.stage.startup import build_state


class ThreadCheckedDict(dict):
    """A dict that records every access from a thread whose name does not start with ``allowed_prefix``."""

    def __init__(self, allowed_prefix: str) -> None:
        super().__init__()
        self.allowed_prefix = allowed_prefix
        self.violations: list[str] = []

    def _check(self, what: str) -> None:
        name = threading.current_thread().name
        if not name.startswith(self.allowed_prefix):
            self.violations.append(f"{what} from thread {name}")


for _method in ("__getitem__", "__setitem__", "__delitem__", "__contains__", "__iter__", "__len__", "get", "pop"):

    def _wrap(method=_method):
        original = getattr(dict, method)

        def checked(self, *args, **kwargs):
            self._check(method)
            return original(self, *args, **kwargs)

        return checked

    setattr(ThreadCheckedDict, _method, _wrap())
for _method in ("items", "values", "keys"):

    def _wrap_view(method=_method):
        original = getattr(dict, method)

        def checked(self):
            self._check(method)
            return original(self)

        return checked

    setattr(ThreadCheckedDict, _method, _wrap_view())


@pytest.fixture(scope="module")
def tiny_stages(stage_dir, tiny_llama_gguf):
    return stage_dir(tiny_llama_gguf, stages=2)


def _stage_state(model_dir, index: int = 0):
    cfg = StageConfig(weights_path=str(model_dir / f"stage-{index}.gguf"), verify_sha256=False, max_sequences=8)
    return build_state(cfg)


def test_only_the_worker_thread_touches_the_sequence_table(tiny_stages):
    state = _stage_state(tiny_stages)
    table = ThreadCheckedDict(allowed_prefix="decode-")
    state.runtime._seqs = table

    async def main() -> None:
        async with TestClient(TestServer(create_stage_app(state))) as client:

            async def forward(seq: int) -> None:
                body = encode_forward([SeqStep(seq, 0, 4)], np.arange(4, dtype=np.int32) + 3)
                resp = await client.post("/v1/forward", data=body, headers={"Content-Type": CONTENT_TYPE})
                assert resp.status == 200, await resp.text()

            async def observe() -> None:
                for _ in range(20):
                    for path in ("/v1/info", "/metrics", "/readyz"):
                        resp = await client.get(path)
                        assert resp.status in (200, 503)
                    await asyncio.sleep(0)

            await asyncio.gather(*(forward(s) for s in range(1, 7)), observe())
            resp = await client.post("/v1/release", json={"seqs": [1, 2, 3]})
            assert (await resp.json())["released"] == 3
            freed = await state.runtime.call(state.runtime.release_idle, 0.0)
            assert sorted(freed) == [4, 5, 6]
            info = await (await client.get("/v1/info")).json()
            assert info["live_sequences"] == 0 and info["kv_tokens_used"] == 0

    try:
        asyncio.run(main())
    finally:
        state.runtime.close()
    assert not table.violations, table.violations[:5]


def test_a_fault_inside_a_decode_is_the_stages_not_the_callers(tiny_stages):
    state = _stage_state(tiny_stages)

    def broken_decode(batch) -> None:
        raise ValueError("operands could not be broadcast together")  # e.g. a numpy shape bug in the stage

    state.runtime.ctx.decode = broken_decode

    async def main() -> tuple[int, dict]:
        async with TestClient(TestServer(create_stage_app(state))) as client:
            body = encode_forward([SeqStep(1, 0, 2)], np.array([3, 4], dtype=np.int32))
            resp = await client.post("/v1/forward", data=body, headers={"Content-Type": CONTENT_TYPE})
            return resp.status, await resp.json()

    try:
        status, body = asyncio.run(main())
    finally:
        state.runtime.close()
    assert status == 500
    assert body["error"]["code"] == ErrorCode.DECODE_FAILED.value
    assert "operands could not be broadcast" in body["error"]["message"]


CALLS = web.AppKey("calls", dict)


def _fake_stage(index: int, forward_answer, release_status: int = 200) -> web.Application:
    """A peer that speaks the stage protocol's outside (info, forward, release) without a model."""
    app = web.Application()
    calls = {"forward": 0, "release": 0}
    app[CALLS] = calls

    async def info(request: web.Request) -> web.Response:
        return web.json_response(
            {"stage_index": index, "sha256": f"sha-{index}", "max_sequences": 8, "n_ctx_seq": 512, "draining": False}
        )

    async def forward(request: web.Request) -> web.Response:
        calls["forward"] += 1
        return forward_answer(await request.read())

    async def release(request: web.Request) -> web.Response:
        calls["release"] += 1
        return web.json_response({"released": 0}, status=release_status)

    app.router.add_get("/v1/info", info)
    app.router.add_post("/v1/forward", forward)
    app.router.add_post("/v1/release", release)
    return app


def _bad_frame(_body: bytes) -> web.Response:
    msg = "frame version 2, this build speaks 1"
    return web.json_response(error_body(ErrorCode.BAD_FRAME, msg, "invalid_request_error"), status=400)


def test_a_stage_that_cannot_read_our_frames_is_marked_down_and_the_client_gets_503(tiny_stages):
    async def main() -> tuple[int, dict, dict, int]:
        fakes = [TestServer(_fake_stage(k, _bad_frame)) for k in range(2)]
        for f in fakes:
            await f.start_server()
        try:
            cfg = CoordinatorConfig(
                stages=tuple((str(f.make_url("")).rstrip("/"),) for f in fakes),
                model_dir=str(tiny_stages),
                health_check_interval_secs=60.0,
                max_retries=1,
                topology="star",  # the fake stages answer forward calls only
            )
            app = create_app(cfg)
            async with TestClient(TestServer(app)) as client:
                for _ in range(600):  # the vocabulary loads in the background
                    if (await client.get("/readyz")).status == 200:
                        break
                    await asyncio.sleep(0.05)
                resp = await client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 4})
                body = await resp.json()
                cluster = await (await client.get("/v1/cluster")).json()
                forwards = fakes[0].app[CALLS]["forward"]
                return resp.status, body, cluster, forwards
        finally:
            for f in fakes:
                await f.close()

    status, body, cluster, forwards = asyncio.run(main())
    assert status == 503, body  # the replica went out of routing: nothing else serves stage 0
    stage0 = [r for r in cluster["replicas"] if r["stage"] == 0][0]
    assert stage0["state"] == "unhealthy" and "frame version" in stage0["last_error"]
    assert forwards >= 1


def test_an_unconfirmed_release_is_retried_then_logged_and_counted(caplog):
    async def main() -> tuple[bool, int, float]:
        fake = TestServer(_fake_stage(0, _bad_frame, release_status=500))
        await fake.start_server()
        metrics = CoordinatorMetrics("m")
        client = StageClient(CoordinatorConfig(stages=(("http://x",),)), metrics)
        await client.start()
        try:
            ok = await client.release(str(fake.make_url("")).rstrip("/"), "stage-0@fake", [7])
        finally:
            await client.close()
            await fake.close()
        return ok, fake.app[CALLS]["release"], metrics.release_failures._value.get()

    with caplog.at_level(logging.WARNING, logger="chatloop.coordinator.stage_client"):
        ok, calls, counted = asyncio.run(main())
    assert not ok and calls == 2 and counted == 1
    assert any("release of 1 sequence(s) on stage-0@fake failed" in r.getMessage() for r in caplog.records)


def test_error_codes_map_to_who_is_at_fault():
    async def main() -> dict[str, CallFailure]:
        got = {}
        for code in ErrorCode:

            def answer(_body: bytes, code=code) -> web.Response:
                from chatloop.protocol.messages import ERROR_STATUS  # noqa: PLC0415

                return web.json_response(error_body(code, "x", "t"), status=ERROR_STATUS[code])

            fake = TestServer(_fake_stage(0, answer))
            await fake.start_server()
            client = StageClient(CoordinatorConfig(stages=(("http://x",),)), CoordinatorMetrics("m"))
            await client.start()
            try:
                await client.forward(
                    str(fake.make_url("")).rstrip("/"), "r", 0, [SeqStep(1, 0, 1)], np.array([1], np.int32), []
                )
            except StageCallError as exc:
                got[code.value] = exc.failure
            finally:
                await client.close()
                await fake.close()
        return got

    got = asyncio.run(main())
    assert got["bad_frame"].replica_fault and got["unauthorized"].replica_fault
    assert got["decode_failed"].replica_fault
    assert got["bad_request"] is CallFailure.INVALID
    assert got["kv_missing"] is CallFailure.KV_MISSING
    assert {got[c] for c in ("capacity", "queue_full", "draining", "cancelled")} == {CallFailure.BUSY}
    assert not any(got[c].replica_fault for c in ("bad_request", "kv_missing", "capacity"))


def test_a_reply_frame_round_trips():
    from chatloop.protocol.messages import SampledToken, TokensReply, decode_reply, encode_tokens  # noqa: PLC0415

    reply = decode_reply(encode_tokens([SampledToken(5, 17, -0.25, [(17, -0.25), (3, -2.0)])]))
    assert isinstance(reply, TokensReply)
    assert reply.tokens == [SampledToken(5, 17, -0.25, [(17, -0.25), (3, -2.0)])]
    header, _ = decode_frame(encode_tokens([SampledToken(1, 2)]))
    assert header["kind"] == "tokens"
