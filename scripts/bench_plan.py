"""Does a plan's prediction hold when served? Two "hosts" of unequal speed on this machine.

Host ``one-thread`` runs its stage with 1 llama.cpp thread, host ``two-threads`` with 2. Each host's speed is
measured first with ``chatloop bench-host``'s code (``bench()``, on the demo model's own layers, same thread
count); ``chatloop plan`` then splits the demo model (SmolLM2-135M-Instruct Q4_1) between them from those
speeds; the plan is converted (``convert --plan``) and served from the stage and coordinator configs the
planner wrote. One stream of greedy completions runs through it, and each stage's busy time per decode
(its ``worker_forward_duration_seconds`` sum / count from ``/metrics``) is set against the plan's predicted
ms per token for that stage. Figures are printed; nothing here passes or fails.

    .venv/bin/python scripts/bench_plan.py                    # about a minute on 2 cores
    .venv/bin/python scripts/bench_plan.py --requests 8 --max-tokens 96
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import urllib.request

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# NOTE: before llama.cpp starts its OpenMP threads: the stage processes run with the same setting (serve.py).
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import _bench_common as bc  # noqa: E402

from chatloop.demo import demo_gguf  # noqa: E402
from chatloop.http_util import free_port  # noqa: E402
from chatloop.plan.bench_host import bench  # noqa: E402
from chatloop.plan.hosts import load_hosts  # noqa: E402
from chatloop.plan.model_shape import from_gguf  # noqa: E402
from chatloop.plan.planner import make_plan  # noqa: E402
from chatloop.plan.render import table, write_outputs  # noqa: E402
from converters.convert import ConvertRequest, convert  # noqa: E402

log = logging.getLogger("bench_plan")

PROMPT = "Explain how a steam engine works, step by step:"


def completion(url: str, max_tokens: int) -> int:
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())["usage"]["completion_tokens"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--bench-steps", type=int, default=60, help="decodes per bench-host timing")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bc.exit_on_sigterm()
    gguf_path = demo_gguf()
    speeds = {}
    for name, threads in (("one-thread", 1), ("two-threads", 2)):
        r = bench(gguf_path, threads, steps=args.bench_steps)
        one = next(t for t in r.timings if t.rows == 1)
        speeds[name] = (threads, r.decode_gb_s(1), one.step_ms)
        log.info("%s: %.2f GB/s, %.3f ms a call (%s)", name, r.decode_gb_s(1), one.step_ms, r.workload)
    with bc.workdir() as tmp:
        work = pathlib.Path(tmp)
        model_dir = work / "model"
        hosts_yaml = {
            "context_tokens": 512,
            "sequences": 4,
            "coordinator_port": free_port(),
            "model_path": str(model_dir),
            "hosts": [
                {
                    "name": name,
                    "address": "127.0.0.1",
                    "memory_gb": 2,
                    "cores": threads,
                    "port": free_port(),
                    "speed": {"decode_gb_s": round(gb_s, 3), "step_overhead_ms": round(step, 4), "threads": threads},
                }
                for name, (threads, gb_s, step) in speeds.items()
            ],
        }
        (work / "hosts.yaml").write_text(yaml.safe_dump(hosts_yaml, sort_keys=False))
        hosts = load_hosts(work / "hosts.yaml")
        plan = make_plan(from_gguf(gguf_path), hosts)
        print(table(plan, hosts), flush=True)
        out = work / "plan"
        write_outputs(plan, hosts, out)
        convert(ConvertRequest(source=str(gguf_path), out=model_dir, layers=plan.layers_arg, quant=plan.quant))
        children = bc.Children(work)
        try:
            stage_urls = []
            for s in plan.stages:
                for proc in s.processes:
                    cfg = out / f"stage-{proc.stage}-{proc.host}.yaml"
                    child = children.start(
                        f"stage-{proc.stage}", [sys.executable, "-m", "chatloop.cli", "stage", "--config", str(cfg)]
                    )
                    stage_urls.append((s, proc, f"http://127.0.0.1:{proc.port}", child))
            for _, _, url, child in stage_urls:
                bc.wait_http(f"{url}/readyz", child)
            coord = children.start(
                "coordinator",
                [sys.executable, "-m", "chatloop.cli", "coordinator", "--config", str(out / "coordinator.yaml")],
            )
            url = f"http://127.0.0.1:{plan.coordinator_port}"
            bc.wait_http(f"{url}/readyz", coord)
            completion(url, 8)  # warm-up
            before = {u: bc.stage_counters(u) for _, _, u, _ in stage_urls}
            tokens = sum(completion(url, args.max_tokens) for _ in range(args.requests))
            after = {u: bc.stage_counters(u) for _, _, u, _ in stage_urls}
        finally:
            children.stop()
    print(f"\n{args.requests} requests, {tokens} tokens, one stream, greedy")
    print(f"{'stage':<6}{'host':<13}{'layers':<8}{'predicted ms':>13}{'measured ms':>13}{'measured/predicted':>20}")
    for s, proc, u, _ in stage_urls:
        d = bc.counters_delta(before[u], after[u])
        measured = 1e3 * d["forward_s"] / max(d["forwards"], 1)
        print(
            f"{s.index:<6}{proc.host:<13}{f'{s.start}:{s.end}':<8}{proc.ms_per_token:>13.2f}{measured:>13.2f}"
            f"{measured / proc.ms_per_token:>20.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
