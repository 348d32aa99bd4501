"""Unit and in-process HTTP tests of the web pages' server side: routes, security headers, API-key gating, the live
view's shape, the rolling statistics, the log formats and the package data."""

from __future__ import annotations

import asyncio
import io
import logging
import pathlib

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chatloop.config import CoordinatorConfig, load_config
from chatloop.coordinator.app import create_app
from chatloop.coordinator.live_stats import LiveStats, percentile
from chatloop.coordinator.web import PAGES, STATIC_DIR
from chatloop.logs import JsonFormatter, ReadableFormatter, resolve_format

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _with_client(cfg_overrides: dict, check) -> None:
    """Run ``await check(client)`` against a coordinator app whose only stage does not exist."""
    cfg = load_config(CoordinatorConfig, overrides={"stages": [["http://127.0.0.1:9"]], **cfg_overrides})

    async def main():
        async with TestClient(TestServer(create_app(cfg))) as client:
            await check(client)

    asyncio.run(main())


def test_pages_assets_and_headers():
    async def check(client):
        for path, (_, ctype) in PAGES.items():
            resp = await client.get(path)
            assert resp.status == 200, path
            assert resp.content_type == ctype
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
        for path in ("/static/", "/static/../web.py", "/static/missing.js", "/static/index.html"):
            assert (await client.get(path)).status == 404, path
        resp = await client.get("/v1/cluster/live")
        assert resp.status == 200
        view = await resp.json()
        assert view["ready"] is False
        assert view["stages"][0]["replicas"][0]["state"] == "unhealthy"
        assert view["stages"][0]["replicas"][0]["last_error"].startswith("health check")
        assert view["coordinator"]["running"] == 0 and view["coordinator"]["ttft_ms"]["p50"] is None

    _with_client({}, check)


def test_pages_open_without_a_key_and_the_data_needs_one():
    async def check(client):
        for path in PAGES:
            assert (await client.get(path)).status == 200, path
        resp = await client.get("/v1/cluster/live")
        assert resp.status == 401
        assert "API key" in (await resp.json())["error"]["message"]
        assert (await client.get("/v1/cluster/live", headers={"Authorization": "Bearer k1"})).status == 200
        assert (await client.post("/v1/chat/completions", json={})).status == 401

    _with_client({"security": {"api_keys": ["k1"]}}, check)


def test_every_page_file_is_package_data():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = data["chatloop.coordinator"]
    for name, _ in PAGES.values():
        assert (STATIC_DIR / name).is_file(), name
        assert any(pathlib.PurePath("static", name).match(p) for p in patterns), name
    # Nothing in the pages loads from elsewhere (no CDN, no network at run time).
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") or path.suffix == ".js", path
        assert "cdn" not in text.lower(), path
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text, path


def test_live_stats_window_and_percentiles():
    now = [1000.0]
    stats = LiveStats(window_secs=60, clock=lambda: now[0])

    class Seq:
        created = 990.0
        first_token_at = None
        last_token_at = None

    seq = Seq()
    stats.on_token(seq, 991.0)  # ttft 1 s
    seq.first_token_at = seq.last_token_at = 991.0
    for i in range(1, 11):
        stats.on_token(seq, 991.0 + i * 0.01 * i)
        seq.last_token_at = 991.0 + i * 0.01 * i
    snap = stats.snapshot()
    assert snap["ttft_ms"] == {"count": 1, "p50": 1000.0, "p90": 1000.0, "p99": 1000.0}
    assert snap["itl_ms"]["count"] == 10
    assert snap["tokens_per_second"] == 1.1  # 11 tokens within the last 10 s
    now[0] = 1061.0  # everything is older than a minute now
    snap = stats.snapshot()
    assert snap["tokens_in_window"] == 0 and snap["ttft_ms"]["p50"] is None and snap["tokens_per_second"] == 0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0 and percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    assert percentile([], 50) is None


def test_log_formats():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert resolve_format("auto", Tty()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", Tty()) == "json"
    with pytest.raises(ValueError, match="expected one of auto, json, text"):
        resolve_format("xml")
    record = logging.LogRecord("chatloop.serve", logging.INFO, __file__, 1, "serving at %s", ("http://h:1",), None)
    line = ReadableFormatter().format(record)
    assert line.endswith(" INFO    serve       serving at http://h:1") and line[2] == ":"
    assert '"message": "serving at http://h:1"' in JsonFormatter().format(record)
