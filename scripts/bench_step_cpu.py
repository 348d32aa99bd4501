#!/usr/bin/env python3
"""CPU milliseconds per generated token of every serving process (coordinator and each stage), and where it goes.

Starts the stages of a converted model (default: the demo model in 2 stages) and a coordinator on loopback
(``benchlib.cluster``), streams greedy chat completions at a chosen concurrency and reads each process's user +
system CPU time before and after (psutil). CPU time, unlike wall time, does not depend on what else the machine is
doing, so the figures compare across commits and data planes on a busy machine: ``--topology star,chain`` measures
both in the same run, ``--checkouts`` runs the processes of other checkouts beside this one's (alternating rounds).
The main thread's share is the event loop's (the decodes run on their own threads).

``--profile`` also samples every process with py-spy (``pip install py-spy``) while the load runs and prints, per
process, the functions that use the most CPU by their own time (the llama.cpp call shows as ``decode``).

    python scripts/bench_step_cpu.py --tokens 256 --concurrency 1
    python scripts/bench_step_cpu.py --concurrency 8 --topology star,chain --profile
    python scripts/bench_step_cpu.py --topology chain --pin --checkouts /tmp/before,. --reps 5   # before / after
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

import benchlib  # noqa: F401 - puts the repository on sys.path
from benchlib.children import Children, exit_on_sigterm, workdir
from benchlib.client import greedy_chat_body
from benchlib.cluster import ChatLoopCluster, ChatLoopVariant, parse_checkouts
from benchlib.stats import cpu_seconds, main_thread_cpu_seconds

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
    pids = cluster.pids
    profilers = start_profilers(pids, outdir) if args.profile else {}
    before = {name: cpu_seconds([pid]) for name, pid in pids.items()}
    loops = {name: main_thread_cpu_seconds(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    tokens = asyncio.run(load(cluster.url, args.requests, args.concurrency, args.tokens))
    wall = time.perf_counter() - start
    after = {name: cpu_seconds([pid]) for name, pid in pids.items()}
    loops = {name: main_thread_cpu_seconds(pid) - loops[name] for name, pid in pids.items()}
    tops = stop_profilers(profilers) if profilers else {}
    n = max(tokens, 1)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "cpu_ms_per_token": {name: 1000 * (after[name] - before[name]) / n for name in pids},
        "loop_cpu_ms_per_token": {name: 1000 * loops[name] / n for name in pids},
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
    ap.add_argument("--pin", action="store_true", help="pin stage K to core K (performance.cpu_cores)")
    ap.add_argument("--pipeline-depth", type=int, default=1, help="coordinator pipeline_depth (0 = one per stage)")
    ap.add_argument("--window-ms", type=float, default=0.0, help="stage batching_window_ms (default 0)")
    ap.add_argument("--topology", default="star", help="star, chain or star,chain")
    ap.add_argument("--checkouts", default="",
                    help="comma-separated checkouts of this repository whose processes to measure, each a "
                         "configuration of its own ('' or . = this one), e.g. /tmp/before,. (build the C "
                         "extension there first: pip install --no-deps -e DIR, or copy chatloop/engine/_capture*.so)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=1, help="rounds; the configurations alternate within each")
    ap.add_argument("--profile", action="store_true", help="sample every process with py-spy, print top functions")
    ap.add_argument("--profile-out", type=pathlib.Path,
                    help="with --profile, keep py-spy's collapsed stacks here (<process>.txt, the last round's)")  # fmt: skip
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = ap.parse_args()
    if args.profile_out:
        args.profile_out.mkdir(parents=True, exist_ok=True)
    exit_on_sigterm()
    topologies = [t.strip() for t in args.topology.split(",") if t.strip()]
    if not topologies or any(t not in ("star", "chain") for t in topologies):
        ap.error(f"--topology: expected star, chain or star,chain, got {args.topology!r}")
    try:
        checkouts = parse_checkouts(args.checkouts)
    except ValueError as exc:
        ap.error(str(exc))
    model_dir = args.model_dir or demo_model_dir(args.stages)
    variants = [
        ChatLoopVariant(
            threads=args.threads,
            pipeline_depth=args.pipeline_depth,
            window_ms=args.window_ms,
            topology=t,
            pin=args.pin,
            checkout=c,
        )
        for t in topologies
        for c in checkouts
    ]
    runs: dict[str, list[dict]] = {v.label: [] for v in variants}
    with workdir() as tmp:
        children = Children(pathlib.Path(tmp))
        try:
            clusters = [ChatLoopCluster(children, model_dir, v, pathlib.Path(tmp)).start() for v in variants]
            for cluster in clusters:
                asyncio.run(load(cluster.url, 1, 1, 8))  # warm-up
            for rep in range(args.reps):
                for v, cluster in zip(variants, clusters):
                    runs[v.label].append(measure(cluster, args, args.profile_out or pathlib.Path(tmp)))
                    print(f"round {rep + 1}/{args.reps}, {v.label}: {_line(runs[v.label][-1])}", flush=True)
        finally:
            children.stop()
    results = {label: _median(rows) for label, rows in runs.items()}
    for label, r in results.items():
        print(
            f"\n{label}: {r['tokens']} tokens a round, concurrency {args.concurrency}, {args.threads} thread(s) per "
            f"stage, median of {args.reps} round(s): {1000 * r['wall_s'] / max(r['tokens'], 1):.2f} ms of wall time "
            "per token"
        )
        for name, ms in r["cpu_ms_per_token"].items():
            loop = r["loop_cpu_ms_per_token"][name]
            print(f"  {name:12s} {ms:7.2f} CPU ms per token, {loop:5.2f} of them on the event loop (main thread)")
        for name, top in r["top_functions"].items():
            print(f"  {name} (py-spy, share of its samples by own time):")
            for fn, share in top:
                print(f"    {100 * share:5.1f} %  {fn}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
    return 0


def _line(r: dict) -> str:
    loops = ", ".join(f"{k} {v:.2f}" for k, v in r["loop_cpu_ms_per_token"].items())
    return f"{1000 * r['wall_s'] / max(r['tokens'], 1):.2f} ms/token wall; event-loop CPU ms per token: {loops}"


def _median(rows: list[dict]) -> dict:
    """Per key, the median over rounds (the profile of the last round)."""
    out = {"tokens": rows[0]["tokens"], "wall_s": statistics.median(r["wall_s"] for r in rows)}
    for key in ("cpu_ms_per_token", "loop_cpu_ms_per_token"):
        out[key] = {name: statistics.median(r[key][name] for r in rows) for name in rows[0][key]}
    out["top_functions"] = rows[-1]["top_functions"]
    return out


if __name__ == "__main__":
    sys.exit(main())
