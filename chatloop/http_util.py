"""HTTP plumbing shared by the stage and the coordinator: error bodies, auth, trace ids, the run loop."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from chatloop.logs import request_id_var, trace_id_var

log = logging.getLogger(__name__)


def error_response(
    status: int,
    message: str,
    err_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict | None = None,
) -> web.Response:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def parse_traceparent(value: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header (``00-<32 hex>-<16 hex>-<2 hex>``), or None."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        int(parts[1], 16)
        int(parts[2], 16)
    except ValueError:
        return None
    return None if parts[1] == "0" * 32 else parts[1].lower()


def new_traceparent(trace_id: str | None) -> str:
    return f"00-{trace_id or uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"


def context_middleware():
    """Set request and trace ids for the logs of each request."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        trace = parse_traceparent(request.headers.get("traceparent"))
        t1 = trace_id_var.set(trace)
        t2 = request_id_var.set(request.headers.get("X-Request-Id"))
        try:
            return await handler(request)
        finally:
            trace_id_var.reset(t1)
            request_id_var.reset(t2)

    return middleware


def token_middleware(check: Callable[[web.Request], bool], open_paths: Iterable[str], message: str):
    open_set = set(open_paths)

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.path not in open_set and not check(request):
            return error_response(401, message, "authentication_error", "unauthorized")
        return await handler(request)

    return middleware


def secret_equals(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


async def run_app(
    app: web.Application, host: str, port: int, drain: Callable[[], Awaitable[None]], ready_line: str | None = None
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT; then await ``drain()`` (stop taking work, finish in-flight
    work within its grace period) and shut down cleanly."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    if ready_line:
        log.info(ready_line)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("signal received: draining")
        await drain()
    finally:
        await runner.cleanup()


# -- for the processes that start servers (chatloop serve, the test harness, the benchmarks) -------------


_handed_out: set[int] = set()  # ports free_port gave this process


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now that this process was never given before.

    NOTE: the port is free only until someone binds it; the kernel may give a port that was just closed again, so
    two children started with ports from two calls could be given the same one and one would fail to bind (seen:
    a test cluster whose stage 0 and stage 2 replicas got one port)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError(f"no free TCP port on {host} that this process was not given before")


def wait_http_ok(
    url: str, proc: subprocess.Popen, timeout: float, detail: Callable[[], str] | None = None, interval: float = 0.1
) -> None:
    """Poll ``GET url`` until it answers 200. RuntimeError when ``proc`` exits first, TimeoutError after
    ``timeout`` seconds; ``detail()`` (say, the process's last log lines) is appended to either message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            what = " ".join(str(a) for a in proc.args[:5]) if isinstance(proc.args, list) else proc.args
            raise RuntimeError(f"{what} exited with {proc.returncode}" + (f":\n{detail()}" if detail else ""))
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s" + (f":\n{detail()}" if detail else ""))
