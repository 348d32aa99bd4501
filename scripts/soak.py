"""Soak test: N minutes of mixed load against ``chatloop serve``, then a report of memory, leaks and errors.

The load (closed loop, ``--clients`` at once) mixes streamed chat completions, non-streamed completions and
native requests, streams cancelled mid-way (the client closes the connection), slow clients (reading a
stream a line at a time with pauses), and bad requests (invalid JSON, out-of-range fields, oversized
bodies, unknown model, lone surrogates, too many stop strings, too-long prompts, wrong method), each
with the status it must get.

Reported at the end:

- RSS of every process (serve supervisor, coordinator, each stage): at the end of the warm-up, at the end,
  the peak, and the growth after warm-up in percent (medians of the samples around each point);
- live sequences left in every stage (``GET /v1/info`` ``live_sequences``) once the load stopped;
- requests by kind and outcome, and errors by kind (unexpected statuses, 5xx, timeouts, protocol errors);
- crashes: a process that died or was restarted by the supervisor (a stage pid that changed).

Targets (exit status 1 when missed): no crash, no leaked sequence, no 5xx other than 503, RSS growth under
``--max-growth`` percent (default 5) after warm-up.

    .venv/bin/python scripts/soak.py                       # 10 minutes on the demo model, started here
    .venv/bin/python scripts/soak.py --minutes 2 --clients 6
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --minutes 30
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import pathlib
import random
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import aiohttp
import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from benchlib.children import Children  # noqa: E402

from chatloop.http_util import free_port  # noqa: E402
from chatloop.launcher import ChildProcess  # noqa: E402

log = logging.getLogger("soak")

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List three fruits:",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


# -- the server ------------------------------------------------------------------------------------------


class Server:
    """``chatloop serve`` started by this script (its own session), or a running server given by URL."""

    def __init__(self, url: str | None, model_dir: str | None, threads: int, logdir: pathlib.Path) -> None:
        self.launched = Children(logdir)
        self.proc: ChildProcess | None = None
        self.children: list[psutil.Process] = []
        if url:
            self.url = url.rstrip("/")
            return
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "chatloop.cli", "serve", "--port", str(port), "--threads", str(threads)]
        if model_dir:
            cmd.insert(4, model_dir)
        self.proc = self.launched.start("serve", cmd)
        self.log_path = self.proc.log_path
        log.info("started chatloop serve (pid %d) on %s; log %s", self.proc.pid, self.url, self.log_path)

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"chatloop serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        if self.proc is not None:
                            self.children = psutil.Process(self.proc.pid).children(recursive=True)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.url} not ready after {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM the supervisor (it drains and stops its children); kill by pid whatever is left."""
        if self.proc is None:
            return
        self.launched.stop(grace=40)
        # The stages run in sessions of their own, out of reach of the supervisor's group.
        for child in self.children:
            try:
                if child.is_running():
                    child.kill()
            except psutil.Error:
                pass


# -- processes and their memory --------------------------------------------------------------------------


@dataclass
class Watched:
    name: str
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, RSS bytes)
    gone: bool = False


def _listener_pid(port: int) -> int | None:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return conn.pid
    except psutil.Error:
        pass
    return None


def discover(server: Server) -> tuple[list[Watched], list[str]]:
    """The processes to watch (coordinator, stages, supervisor) and the stage URLs."""
    cluster = get_json(f"{server.url}/v1/cluster")
    watched: list[Watched] = []
    stage_urls = []
    for rep in cluster["replicas"]:
        info = get_json(f"{rep['url']}/v1/info")
        stage_urls.append(rep["url"])
        watched.append(Watched(f"stage-{rep['stage']} ({rep['name']})", int(info["pid"])))
    coordinator = None
    for child in server.children:
        try:
            if "coordinator" in child.cmdline():
                coordinator = child.pid
        except psutil.Error:
            pass
    if coordinator is None:
        coordinator = _listener_pid(int(server.url.rsplit(":", 1)[1].split("/")[0]))
    if coordinator is not None:
        watched.insert(0, Watched("coordinator", coordinator))
    else:
        log.warning("coordinator pid not found (a remote server?): its memory is not watched")
    if server.proc is not None:
        watched.append(Watched("serve supervisor", server.proc.pid))
    return watched, stage_urls


def sample(watched: list[Watched], t: float) -> None:
    for w in watched:
        try:
            w.samples.append((t, psutil.Process(w.pid).memory_info().rss))
        except psutil.Error:
            w.gone = True


def _median_around(samples: list[tuple[float, int]], t: float, window: float) -> int | None:
    near = [rss for ts, rss in samples if abs(ts - t) <= window]
    return int(statistics.median(near)) if near else None


# -- the load --------------------------------------------------------------------------------------------


@dataclass
class Stats:
    outcomes: collections.Counter = field(default_factory=collections.Counter)  # (kind, outcome)
    errors: collections.Counter = field(default_factory=collections.Counter)  # error kind
    server_errors: int = 0
    tokens: int = 0

    def error(self, kind: str, what: str) -> None:
        self.outcomes[(kind, "error")] += 1
        self.errors[f"{kind}: {what}"] += 1


def _bad_requests(n_vocab: int) -> list[tuple[str, str, str, bytes | None, set[int]]]:
    """(name, method, path, body, expected statuses)."""
    j = json.dumps
    return [
        ("invalid JSON", "POST", "/v1/completions", b"{nope", {400}),
        ("not an object", "POST", "/v1/chat/completions", b"[1, 2]", {400}),
        ("temperature 5", "POST", "/v1/completions", j({"prompt": "x", "temperature": 5}).encode(), {400}),
        ("max_tokens 0", "POST", "/v1/inference", j({"prompt": "x", "max_tokens": 0}).encode(), {400}),
        ("unknown model", "POST", "/v1/completions", j({"prompt": "x", "model": "nope"}).encode(), {404}),
        ("17 stop strings", "POST", "/v1/completions", j({"prompt": "x", "stop": ["a"] * 17}).encode(), {400}),
        (
            "logit_bias id",
            "POST",
            "/v1/completions",
            j({"prompt": "x", "logit_bias": {str(n_vocab): 1}}).encode(),
            {400},
        ),
        ("lone surrogate", "POST", "/v1/completions", b'{"prompt": "\\ud800"}', {400}),
        ("empty messages", "POST", "/v1/chat/completions", j({"messages": []}).encode(), {400}),
        ("bad role", "POST", "/v1/chat/completions", j({"messages": [{"role": "x", "content": "y"}]}).encode(), {400}),
        ("prompt over context", "POST", "/v1/completions", j({"prompt": [1] * 20000, "max_tokens": 1}).encode(), {400}),
        ("huge max_tokens", "POST", "/v1/completions", j({"prompt": "x", "max_tokens": 1 << 20}).encode(), {400}),
        ("oversized body", "POST", "/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}', {413}),
        ("wrong method", "GET", "/v1/completions", None, {405}),
        ("unknown path", "GET", "/v1/nothing", None, {404}),
    ]


class Load:
    def __init__(self, url: str, stats: Stats, max_tokens: int, n_vocab: int, seed: int) -> None:
        self.url = url
        self.stats = stats
        self.max_tokens = max_tokens
        self.bad = _bad_requests(n_vocab)
        self.rng = random.Random(seed)
        self.kinds = ["stream_chat", "completion", "native", "cancel", "slow_stream", "bad"]
        self.weights = [30, 20, 10, 15, 10, 15]

    def _body(self, chat: bool) -> dict:
        prompt = self.rng.choice(PROMPTS)
        body: dict = {
            "max_tokens": self.rng.randint(max(1, self.max_tokens // 4), self.max_tokens),
            "temperature": self.rng.choice([0, 0.7, 1.0]),
            "seed": self.rng.randint(0, 1000),
        }
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    async def one(self, session: aiohttp.ClientSession) -> None:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        try:
            await getattr(self, f"_{kind}")(session, kind)
        except asyncio.TimeoutError:
            self.stats.error(kind, "timeout")
        except aiohttp.ClientError as exc:
            self.stats.error(kind, f"{type(exc).__name__}")

    def _status(self, kind: str, status: int, ok: set[int] | None = None) -> bool:
        if status in (ok or {200}):
            return True
        if status == 503:
            self.stats.outcomes[(kind, "503")] += 1  # overloaded or not ready: a documented answer
            return False
        if status >= 500:
            self.stats.server_errors += 1
        self.stats.error(kind, f"status {status}")
        return False

    async def _stream(self, session, kind: str, chat: bool, stop_after: int | None, pause: float) -> None:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {**self._body(chat), "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(self.url + path, json=body) as resp:
            if not self._status(kind, resp.status):
                await resp.read()
                return
            events = 0
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    self.stats.error(kind, f"stream error: {event['error'].get('code')}")
                    return
                events += 1
                if stop_after is not None and events >= stop_after:
                    resp.close()  # NOTE: closes the connection mid-stream: the server must cancel the request
                    self.stats.outcomes[(kind, "cancelled")] += 1
                    return
                if pause:
                    await asyncio.sleep(pause)
            if not done:
                self.stats.error(kind, "stream ended without [DONE]")
                return
            self.stats.outcomes[(kind, "ok")] += 1
            self.stats.tokens += events

    async def _stream_chat(self, session, kind) -> None:
        await self._stream(session, kind, chat=True, stop_after=None, pause=0.0)

    async def _cancel(self, session, kind) -> None:
        await self._stream(session, kind, chat=self.rng.random() < 0.5, stop_after=self.rng.randint(1, 4), pause=0.0)

    async def _slow_stream(self, session, kind) -> None:
        await self._stream(session, kind, chat=True, stop_after=None, pause=self.rng.uniform(0.2, 0.6))

    async def _completion(self, session, kind) -> None:
        async with session.post(f"{self.url}/v1/completions", json=self._body(chat=False)) as resp:
            body = await resp.json(content_type=None)
            if self._status(kind, resp.status):
                self.stats.outcomes[(kind, "ok")] += 1
                self.stats.tokens += body["usage"]["completion_tokens"]

    async def _native(self, session, kind) -> None:
        body = self._body(chat=False)
        async with session.post(f"{self.url}/v1/inference", json=body) as resp:
            got = await resp.json(content_type=None)
            if self._status(kind, resp.status):
                self.stats.outcomes[(kind, "ok")] += 1
                self.stats.tokens += got["usage"]["completion_tokens"]

    async def _bad(self, session, kind) -> None:
        name, method, path, data, expected = self.rng.choice(self.bad)
        headers = {"Content-Type": "application/json"}
        async with session.request(method, self.url + path, data=data, headers=headers) as resp:
            raw = await resp.read()
            if resp.status in expected:
                try:
                    err = json.loads(raw)["error"]
                    assert err["message"] and "type" in err
                except (ValueError, KeyError, TypeError, AssertionError):
                    self.stats.error(kind, f"{name}: not the OpenAI error shape")
                    return
                self.stats.outcomes[(kind, "refused as expected")] += 1
            else:
                if resp.status >= 500 and resp.status != 503:
                    self.stats.server_errors += 1
                self.stats.error(kind, f"{name}: status {resp.status}, expected {sorted(expected)}")


async def run_load(url: str, stats: Stats, until: float, clients: int, max_tokens: int, n_vocab: int) -> None:
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client(i: int) -> None:
            load = Load(url, stats, max_tokens, n_vocab, seed=i)
            while time.monotonic() < until:
                await load.one(session)

        await asyncio.gather(*(client(i) for i in range(clients)))


# -- main ------------------------------------------------------------------------------------------------


def live_sequences(stage_urls: list[str]) -> dict[str, int | None]:
    out = {}
    for url in stage_urls:
        try:
            out[url] = get_json(f"{url}/v1/info")["live_sequences"]
        except (OSError, ValueError, KeyError):
            out[url] = None
    return out


def report(args, watched, stats, live, crashes, t_warm, t_end, elapsed) -> tuple[str, bool]:
    lines = [f"soak: {elapsed / 60:.1f} min of load, {args.clients} clients, warm-up {t_warm / 60:.1f} min", ""]
    lines.append(f"{'process':<36} {'pid':>7} {'RSS warm MB':>12} {'RSS end MB':>11} {'peak MB':>8} {'growth':>8}")
    worst = 0.0
    window = max(args.sample_secs * 1.5, 15.0)
    for w in watched:
        warm = _median_around(w.samples, t_warm, window)
        end = _median_around(w.samples, t_end, window)
        peak = max((rss for _, rss in w.samples), default=0)
        growth = (end - warm) / warm * 100 if warm and end else float("nan")
        if w.name != "serve supervisor":
            worst = max(worst, growth if growth == growth else 0.0)
        mb = 1 << 20
        lines.append(
            f"{w.name:<36} {w.pid:>7} {(warm or 0) / mb:>12.1f} {(end or 0) / mb:>11.1f} {peak / mb:>8.1f} "
            f"{growth:>7.2f}%" + ("  GONE" if w.gone else "")
        )
    lines.append("")
    leaked = sum(v for v in live.values() if v)
    lines.append("live sequences left: " + ", ".join(f"{u}: {v}" for u, v in live.items()))
    lines.append("")
    lines.append(f"requests by kind and outcome ({stats.tokens} generated tokens counted):")
    for (kind, outcome), n in sorted(stats.outcomes.items()):
        lines.append(f"  {kind:<14} {outcome:<22} {n:>6}")
    lines.append("errors by kind:" + ("" if stats.errors else " none"))
    for what, n in stats.errors.most_common():
        lines.append(f"  {what:<60} {n:>6}")
    lines.append(f"server errors (5xx other than 503): {stats.server_errors}")
    lines.append("crashes: " + ("; ".join(crashes) if crashes else "none"))
    ok = not crashes and leaked == 0 and stats.server_errors == 0 and worst < args.max_growth
    lines.append("")
    lines.append(
        f"targets: no crash {'OK' if not crashes else 'MISSED'}, no leaked sequence {'OK' if leaked == 0 else 'MISSED'}, "
        f"no 5xx {'OK' if stats.server_errors == 0 else 'MISSED'}, RSS growth {worst:.2f}% < {args.max_growth}% "
        f"{'OK' if worst < args.max_growth else 'MISSED'}"
    )
    return "\n".join(lines), ok


async def soak(args, server: Server) -> int:
    watched, stage_urls = discover(server)
    pids = {w.name: w.pid for w in watched}
    n_vocab = get_json(f"{stage_urls[-1]}/v1/info").get("n_vocab") or 1
    log.info("watching %s", ", ".join(f"{w.name} pid {w.pid}" for w in watched))
    start = time.monotonic()
    duration = args.minutes * 60
    t_warm = min(args.warmup_minutes * 60, duration / 2)
    stats = Stats()
    load = asyncio.get_running_loop().create_task(
        run_load(server.url, stats, start + duration, args.clients, args.max_tokens, n_vocab)
    )
    crashes: list[str] = []
    next_report = start + 60
    while not load.done():
        now = time.monotonic()
        sample(watched, now - start)
        for w in watched:
            if w.gone and not any(w.name in c for c in crashes):
                crashes.append(f"{w.name} (pid {w.pid}) is gone")
        if now >= next_report:
            next_report += 60
            total = sum(stats.outcomes.values())
            log.info(
                "%.0f s: %d requests, %d errors, RSS %s",
                now - start,
                total,
                sum(stats.errors.values()),
                ", ".join(f"{w.name} {w.samples[-1][1] / (1 << 20):.0f} MB" for w in watched if w.samples),
            )
        await asyncio.wait([load], timeout=args.sample_secs)
    await load
    t_end = time.monotonic() - start
    sample(watched, t_end)
    # Every sequence must be freed once the load stops (cancelled streams included): allow a few seconds.
    deadline = time.monotonic() + 20
    live = live_sequences(stage_urls)
    while any(live.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        live = live_sequences(stage_urls)
    try:
        cluster = get_json(f"{server.url}/v1/cluster")
        for rep in cluster["replicas"]:
            name = f"stage-{rep['stage']} ({rep['name']})"
            if rep.get("pid") and name in pids and rep["pid"] != pids[name]:
                crashes.append(f"{name} restarted (pid {pids[name]} -> {rep['pid']})")
    except (OSError, ValueError) as exc:
        crashes.append(f"coordinator not answering: {exc}")
    text, ok = report(args, watched, stats, live, crashes, t_warm, t_end, t_end)
    print(text, flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps(
                {
                    "minutes": t_end / 60,
                    "processes": [{"name": w.name, "pid": w.pid, "samples": w.samples} for w in watched],
                    "live_sequences": live,
                    "outcomes": {f"{k}/{o}": n for (k, o), n in stats.outcomes.items()},
                    "errors": dict(stats.errors),
                    "server_errors": stats.server_errors,
                    "crashes": crashes,
                    "ok": ok,
                },
                indent=1,
            )
        )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the load (default 10)")
    p.add_argument("--warmup-minutes", type=float, default=2.0, help="RSS baseline taken after this (default 2)")
    p.add_argument("--url", help="a running coordinator; default: start chatloop serve on the demo model here")
    p.add_argument("--model-dir", help="converted model for the chatloop serve started here (default: demo)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads per stage of the serve started here")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of generated requests")
    p.add_argument("--sample-secs", type=float, default=5.0, help="RSS sampling interval")
    p.add_argument("--max-growth", type=float, default=5.0, help="RSS growth target after warm-up, percent")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logdir = pathlib.Path(tempfile.mkdtemp(prefix="chatloop-soak-"))
    server = Server(args.url, args.model_dir, args.threads, logdir)
    try:
        server.wait_ready()
        return asyncio.run(soak(args, server))
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
