#!/usr/bin/env python3
"""CPU milliseconds per generated token of every serving process (coordinator and each stage).

Starts the stages of a converted model (default: the demo model in 2 stages) and a coordinator on loopback with
the plain CLI (``chatloop stage`` / ``chatloop coordinator``), streams greedy completions at a chosen concurrency
and reads each process's user + system CPU time before and after (psutil). CPU time, unlike wall time, does not
depend on what else the machine is doing, so the figures compare across commits on a busy machine: run this
script from two checkouts to compare their per-token Python work.

    python scripts/bench_step_cpu.py --tokens 256 --concurrency 1
    python scripts/bench_step_cpu.py --concurrency 8 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[3]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s")


def cpu_of(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def stream(session, url: str, prompt: str, max_tokens: int) -> int:
    """One streamed greedy chat completion; returns its completion tokens (from the usage chunk)."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        async for raw in resp.content:
            line = raw.strip()
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                obj = json.loads(line[5:])
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
    return tokens


async def load(url: str, n_requests: int, concurrency: int, max_tokens: int) -> int:
    import aiohttp  # noqa: PLC0415

    prompts = [f"{i}. Write a long story about a lighthouse keeper and a storm." for i in range(n_requests)]
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1200)) as session:

        async def one(p: str) -> int:
            async with sem:
                return await stream(session, url, p, max_tokens)

        return sum(await asyncio.gather(*(one(p) for p in prompts)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=pathlib.Path, help="converted model (default: the demo model, 2 stages)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per request")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per stage")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.model_dir is None:
        from chatloop.demo import demo_model_dir  # noqa: PLC0415

        args.model_dir = demo_model_dir(2)
    manifest = json.loads((args.model_dir / "partition_metadata.json").read_text())
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GOMP_SPINCOUNT": "20000"}
    cli = [sys.executable, "-m", "chatloop.cli"]
    procs: dict[str, subprocess.Popen] = {}
    logs = tempfile.TemporaryDirectory(prefix="bench-step-cpu-")
    try:
        urls = []
        for s in manifest["stages"]:
            port = free_port()
            cmd = [*cli, "stage", "--weights", str(args.model_dir / s["file"]), "--port", str(port)]
            cmd += ["--threads", str(args.threads), "--no-verify"]
            log = open(pathlib.Path(logs.name) / f"stage-{s['index']}.log", "wb")
            procs[f"stage-{s['index']}"] = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            urls.append(f"http://127.0.0.1:{port}")
        for proc, url in zip(procs.values(), urls):
            wait_ok(f"{url}/readyz", proc)
        port = free_port()
        cmd = [*cli, "coordinator", "--port", str(port), "--model-dir", str(args.model_dir)]
        for url in urls:
            cmd += ["--stage", url]
        log = open(pathlib.Path(logs.name) / "coordinator.log", "wb")
        procs["coordinator"] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        wait_ok(f"{url}/readyz", procs["coordinator"])
        asyncio.run(load(url, 1, 1, 8))  # warm-up
        before = {name: cpu_of(p.pid) for name, p in procs.items()}
        start = time.perf_counter()
        tokens = asyncio.run(load(url, args.requests, args.concurrency, args.tokens))
        wall = time.perf_counter() - start
        after = {name: cpu_of(p.pid) for name, p in procs.items()}
        print(f"{tokens} tokens, concurrency {args.concurrency}, {args.threads} thread(s) per stage, {wall:.1f} s wall")
        for name in procs:
            print(f"  {name:12s} {1000 * (after[name] - before[name]) / tokens:7.2f} CPU ms per token")
        return 0
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        logs.cleanup()


if __name__ == "__main__":
    sys.exit(main())
