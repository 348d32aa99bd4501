#!/usr/bin/env python3
"""CPU milliseconds per generated token of every serving process (coordinator and each stage), and where it goes.

Starts the stages of a converted model (default: the demo model in 2 stages) and a coordinator on loopback
(``benchlib.cluster``), streams greedy chat completions at a chosen concurrency and reads each process's user +
system CPU time before and after (psutil). CPU time, unlike wall time, does not depend on what else the machine is
doing, so the figures compare across commits and data planes on a busy machine: ``--topology star,chain`` measures
both in the same run; run the script from two checkouts to compare their per-token Python work.

``--profile`` also samples every process with py-spy (``pip install py-spy``) while the load runs and prints, per
process, the functions that use the most CPU by their own time (the llama.cpp call shows as ``decode``).

    python scripts/bench_step_cpu.py --tokens 256 --concurrency 1
    python scripts/bench_step_cpu.py --concurrency 8 --topology star,chain --profile
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import pathlib
import shutil
import subprocess
import sys
import time

import benchlib  # noqa: F401 - puts the repository on sys.path
from benchlib.children import Children, exit_on_sigterm, workdir
from benchlib.client import greedy_chat_body
from benchlib.cluster import ChatLoopCluster, ChatLoopVariant
from benchlib.stats import cpu_seconds

from chatloop.demo import demo_model_dir


async def stream(session, url: str, prompt: str, max_tokens: int) -> int:
    """One streamed greedy chat completion; returns its completion tokens (from the usage chunk)."""
    body = greedy_chat_body([{"role": "user", "content": prompt}], max_tokens)
    tokens = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
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


def start_profilers(pids: dict[str, int], outdir: pathlib.Path) -> dict[str, tuple[subprocess.Popen, pathlib.Path]]:
    """One ``py-spy record`` per process, collapsed stacks (``--format raw``) into ``outdir``."""
    spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")
    if not pathlib.Path(spy).is_file():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    out = {}
    for name, pid in pids.items():
        path = outdir / f"{name}.txt"
        cmd = [spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(path), "--rate", "200",
               "--nonblocking"]  # fmt: skip
        out[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path)
    time.sleep(1.0)  # NOTE: py-spy attaches asynchronously; samples before the load only add idle stacks
    return out


def short_frame(frame: str) -> str:
    """py-spy's ``function (/long/path/file.py:123)`` as ``function (file.py:123)``."""
    name, sep, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if sep else frame


def stop_profilers(profilers: dict[str, tuple[subprocess.Popen, pathlib.Path]]) -> dict[str, list[tuple[str, float]]]:
    """SIGINT every py-spy (it then writes its file); per process the top functions by own samples (share)."""
    for proc, _ in profilers.values():
        proc.send_signal(2)
    tops = {}
    for name, (proc, path) in profilers.items():
        proc.wait(timeout=60)
        own: collections.Counter[str] = collections.Counter()
        for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            own[short_frame(stack.rsplit(";", 1)[-1])] += int(count)
        total = sum(own.values()) or 1
        tops[name] = [(fn, n / total) for fn, n in own.most_common(8)]
    return tops


def measure(cluster: ChatLoopCluster, args, outdir: pathlib.Path) -> dict:
    asyncio.run(load(cluster.url, 1, 1, 8))  # warm-up
    pids = cluster.pids
    profilers = start_profilers(pids, outdir) if args.profile else {}
    before = {name: cpu_seconds([pid]) for name, pid in pids.items()}
    start = time.perf_counter()
    tokens = asyncio.run(load(cluster.url, args.requests, args.concurrency, args.tokens))
    wall = time.perf_counter() - start
    after = {name: cpu_seconds([pid]) for name, pid in pids.items()}
    tops = stop_profilers(profilers) if profilers else {}
    return {
        "tokens": tokens,
        "wall_s": wall,
        "cpu_ms_per_token": {n: 1000 * (after[n] - before[n]) / max(tokens, 1) for n in pids},
        "top_functions": tops,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=pathlib.Path, help="converted model (default: the demo model, 2 stages)")
    ap.add_argument("--stages", type=int, default=2, help="stages of the demo model when no --model-dir (default 2)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per request")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per stage")
    ap.add_argument("--topology", default="star", help="star, chain or star,chain (measured one after the other)")
    ap.add_argument("--profile", action="store_true", help="sample every process with py-spy, print top functions")
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = ap.parse_args()
    exit_on_sigterm()
    topologies = [t.strip() for t in args.topology.split(",") if t.strip()]
    if not topologies or any(t not in ("star", "chain") for t in topologies):
        ap.error(f"--topology: expected star, chain or star,chain, got {args.topology!r}")
    model_dir = args.model_dir or demo_model_dir(args.stages)
    results = {}
    with workdir() as tmp:
        children = Children(pathlib.Path(tmp))
        try:
            for topology in topologies:
                variant = ChatLoopVariant(threads=args.threads, topology=topology)
                cluster = ChatLoopCluster(children, model_dir, variant, pathlib.Path(tmp)).start()
                try:
                    results[topology] = measure(cluster, args, pathlib.Path(tmp))
                finally:
                    cluster.stop()
        finally:
            children.stop()
    for topology, r in results.items():
        print(
            f"\n{topology}: {r['tokens']} tokens, concurrency {args.concurrency}, {args.threads} thread(s) per stage, "
            f"{r['wall_s']:.1f} s wall"
        )
        for name, ms in r["cpu_ms_per_token"].items():
            print(f"  {name:12s} {ms:7.2f} CPU ms per token")
        for name, top in r["top_functions"].items():
            print(f"  {name} (py-spy, share of its samples by own time):")
            for fn, share in top:
                print(f"    {100 * share:5.1f} %  {fn}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
