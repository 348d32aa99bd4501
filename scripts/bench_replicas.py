"""Replicas per stage under ``chatloop serve``: 1 replica vs 2 replicas with the cores divided between them
(the default) vs 2 replicas that each use every core (the old default), at one concurrency, in the same run.

    .venv/bin/python scripts/bench_replicas.py                      # r1 vs r2, concurrency 8, 2 alternations
    .venv/bin/python scripts/bench_replicas.py --reps 3 --configs r1,r2,r2-all-cores   # slow: r2-all-cores

Each configuration is a real ``chatloop serve`` process tree (demo model, 2 stages); all are started first,
then closed-loop load (benchlib/load.py, unique prompts, greedy, max_tokens 32) alternates between them. Prints
tokens/s per configuration and run, the ratio to r1 and the load average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import statistics
import sys

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from benchlib.children import Children, exit_on_sigterm, tail, workdir  # noqa: E402
from benchlib.load import UniquePrompts, run_load  # noqa: E402

from chatloop.demo import demo_gguf, demo_model_dir  # noqa: E402
from chatloop.http_util import free_port, wait_http_ok  # noqa: E402

log = logging.getLogger("bench")

# serve flags of each configuration
CONFIGS = {
    "r1": ["--replicas", "1"],  # one process per stage, every core (no pinning)
    "r2": ["--replicas", "2"],  # two per stage, each replica pinned to its own share of the cores
    "r2-all-cores": ["--replicas", "2", "--threads", str(os.cpu_count() or 2)],  # explicit threads: no division
}
PROMPTS = [
    "The history of the Roman Empire",
    "Explain how a steam engine works, step by step:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List five uses of copper and why each one depends on its properties:",
]


def start_serve(children: Children, name: str, flags: list[str], model_dir: pathlib.Path, topology: str) -> str:
    port = free_port()
    config = pathlib.Path(children.logdir) / f"cluster-{name}.yaml"
    coordinator = {"topology": "chain", "ring_steps": False} if topology == "chain-no-ring" else {"topology": topology}
    config.write_text(yaml.safe_dump({"coordinator": coordinator}))
    cmd = [sys.executable, "-m", "chatloop.cli", "serve", str(model_dir), "--port", str(port), "--config", str(config)]
    cmd += flags
    proc = children.start(name, cmd)
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(f"{url}/readyz", proc.popen, 300, detail=lambda: tail(proc))
    return url


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=16, help="requests per measurement")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=2, help="alternations over the configurations")
    p.add_argument("--configs", default="r1,r2", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--topology", choices=["star", "chain", "chain-no-ring"], default="star",
                   help="coordinator topology; chain-no-ring: the chain without ring steps (default star)")  # fmt: skip
    p.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = p.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown} (known: {', '.join(CONFIGS)})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    exit_on_sigterm()
    from chatloop.engine.tokenizer import Tokenizer  # noqa: PLC0415

    prompts = UniquePrompts(PROMPTS, Tokenizer(demo_gguf()).tokenize)
    model_dir = demo_model_dir(2)
    results: dict[str, list[float]] = {n: [] for n in names}
    load_before = os.getloadavg()
    with workdir() as tmp:
        children = Children(pathlib.Path(tmp))
        try:
            urls = {n: start_serve(children, n, CONFIGS[n], model_dir, args.topology) for n in names}
            for url in urls.values():
                asyncio.run(run_load(url, prompts, 4, 4, 8))  # warm-up
            for rep in range(args.reps):
                for n in names:
                    res = asyncio.run(run_load(urls[n], prompts, args.requests, args.concurrency, args.max_tokens))
                    s = res.summary()
                    results[n].append(s["tok_s"])
                    print(
                        f"rep {rep} {n:13s} {s['tok_s']:6.1f} tok/s  errors {s['errors']}  "
                        f"itl p50 {s['itl_p50_ms']:.1f} ms  load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
        finally:
            children.stop()
    load_after = os.getloadavg()
    base = statistics.median(results[names[0]])
    print(
        f"\ntopology {args.topology}, concurrency {args.concurrency}, {args.requests} requests x {args.max_tokens} tokens, {args.reps} reps"
    )
    print(f"load average before {load_before[0]:.2f} / {load_before[1]:.2f}, after {load_after[0]:.2f}")
    for n in names:
        med = statistics.median(results[n])
        runs = ", ".join(f"{v:.1f}" for v in results[n])
        print(f"{n:14s} median {med:6.1f} tok/s  ({runs})  {med / base:.2f}x {names[0]}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "load_before": load_before, "load_after": load_after}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
