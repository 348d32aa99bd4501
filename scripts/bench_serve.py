"""Serving benchmark: one stream through the served stage chain against the whole model in one process.

The served side is real processes on loopback: one per stage plus the coordinator, driven by an aiohttp
client over the OpenAI API (``POST /v1/completions``, ``stream: true``, temperature 0). The in-process side
is the whole GGUF in one ``StageRuntime`` (llama-cpp-python's low-level API) in this process, with the same
thread count and context settings, doing the same prefill and greedy decode. Several served
configurations (``--served``: threads per stage and the stages' OpenMP waiting) are up at once and measured
in turn; repetitions alternate (in-process, each served one, in-process, ...) so machine noise falls on
all of them; the table shows medians.

Figures:
- TTFT: request sent -> first text chunk (served); prefill + first sample (in-process).
- decode ms/token: (last token time - first token time) / (tokens - 1), i.e. steady decode only.
- per-hop overhead: (served ms/token - in-process ms/token) / hops, where one hop is one HTTP round trip
  coordinator -> stage -> coordinator; a decode step makes one per stage (2 for 2 stages). It also carries
  the chain's own cost (one more llama_decode per stage, the hidden-state hand-off), which the stage
  compute line separates out: the stages' own forward time (from their /metrics) against the in-process
  step.

With ``--topology star,chain`` every served configuration runs in both data planes (docs/design.md, "The chain
data plane"), alternating in the same run; a crossing is then one link traversal (2 x N per token in the star,
N + 1 in the chain without ring steps (``chain-no-ring``), N with them) and the table adds the chain / star ratios. ``--delay-ms`` puts a ``delay_proxy.py`` with that
one-way delay in front of every stage, so every link (coordinator -> stage, and stage -> stage in the chain) pays it.

    .venv/bin/python scripts/bench_serve.py                 # demo SmolLM2-135M-Instruct Q4_1, 2 stages
    .venv/bin/python scripts/bench_serve.py --threads 2 --reps 7 --max-tokens 128
    .venv/bin/python scripts/bench_serve.py --served t1:spin20000 --topology star,chain
    .venv/bin/python scripts/bench_serve.py --threads 1 --served t1:spin20000 --pin --topology star,chain
    .venv/bin/python scripts/bench_serve.py --stages 3 --served t1:spin20000 --topology star,chain --delay-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_pipeline_floor import Pipeline, in_process_times  # noqa: E402
from benchlib.children import Children, exit_on_sigterm, workdir  # noqa: E402
from benchlib.client import StreamResult, stream_completion  # noqa: E402
from benchlib.cluster import ChatLoopCluster, ChatLoopVariant, parse_checkouts  # noqa: E402
from benchlib.in_process import InProcess  # noqa: E402
from benchlib.omp import omp_env  # noqa: E402
from benchlib.options import comma_list  # noqa: E402
from benchlib.stats import counters_delta, cpu_seconds, stage_counters  # noqa: E402

from chatloop.config import parse_cpu_list  # noqa: E402
from chatloop.demo import demo_gguf, demo_model_dir  # noqa: E402
from chatloop.modelfiles.manifest import load_manifest  # noqa: E402

log = logging.getLogger("bench_serve")

PROMPT = (
    "Explain how a steam engine works, step by step. Describe the boiler, the firebox, the cylinder, the piston, "
    "the valves and the condenser, and say what each part does and why it matters for the efficiency of the engine:"
)


async def served_once(url: str, prompt: list[int], max_tokens: int) -> StreamResult:
    import aiohttp  # noqa: PLC0415

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        res = await stream_completion(session, url, prompt, max_tokens)
    if res.error:
        raise RuntimeError(f"served request failed: {res.error}")
    return res


def decode_ms(res: StreamResult) -> float:
    times = res.chunk_times
    return 1000 * (times[-1] - times[0]) / (len(times) - 1)


def parse_served(spec: str, threads: int) -> list[ChatLoopVariant]:
    """``spin20000,passive`` or ``t1:default``-style entries: the served configurations to measure."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        t, _, policy = item.rpartition(":")
        try:
            omp_env(policy)
            if t and not t.startswith("t"):
                raise ValueError(t)
        except ValueError:
            raise SystemExit(
                f"--served: expected entries like spin20000, passive or t1:default, got {item!r}"
            ) from None
        # A single stream: the stages never run at the same time, so each may use every thread.
        out.append(ChatLoopVariant(int(t[1:]) if t else threads, 0, 3.0, policy))
    return out


def measure_served(cluster: ChatLoopCluster, prompt: list[int], max_tokens: int) -> dict:
    """One request's figures. With the coordinator pinned (``--coordinator-cores``) this client (the process that
    reads the stream) runs on the coordinator's cores too, so that neither wakes on a stage's core."""
    cores = cluster.variant.coordinator_cores
    everywhere = os.sched_getaffinity(0)
    if cores:
        os.sched_setaffinity(0, parse_cpu_list(cores))
    try:
        return _measure_served(cluster, prompt, max_tokens)
    finally:
        os.sched_setaffinity(0, everywhere)


def _measure_served(cluster: ChatLoopCluster, prompt: list[int], max_tokens: int) -> dict:
    # NOTE: the request's forward calls include its prompt's (whole 64-row blocks: tens of decodes' worth, +20 % on
    # the mean of 128 calls). A one-token request with the same prompt first gives the prompt's calls to subtract.
    # The processes' CPU time likewise: the one-token request's (the prompt's) is subtracted from the whole one's.
    before = {u: stage_counters(u) for u in cluster.stage_urls}
    cpu_before = {name: cpu_seconds([pid]) for name, pid in cluster.pids.items()}
    asyncio.run(served_once(cluster.url, prompt, 1))
    cpu_prompt = {k: cpu_seconds([pid]) - cpu_before[k] for k, pid in cluster.pids.items()}
    middle = {u: stage_counters(u) for u in cluster.stage_urls}
    cpu0 = {name: cpu_seconds([pid]) for name, pid in cluster.pids.items()}
    res = asyncio.run(served_once(cluster.url, prompt, max_tokens))
    cpu1 = {name: cpu_seconds([pid]) for name, pid in cluster.pids.items()}
    prompt_only = [counters_delta(before[u], middle[u]) for u in cluster.stage_urls]
    whole = [counters_delta(middle[u], stage_counters(u)) for u in cluster.stage_urls]
    n = len(res.chunk_times)

    def per_decode(key: str, count: str) -> float:
        """ms per decode call, summed over the stages: the request's calls less the prompt's."""
        return sum(
            1000 * (w[key] - p[key]) / max(w[count] - p[count], 1) for w, p in zip(whole, prompt_only, strict=True)
        )

    return {
        "tokens": n,
        "ttft_ms": 1000 * res.ttft,
        "decode_ms": decode_ms(res),
        "stage_compute_ms": per_decode("forward_s", "forwards"),
        "stage_queue_ms": per_decode("queue_s", "queued"),
        "cpu_ms_per_token": {k: 1000 * (cpu1[k] - cpu0[k] - cpu_prompt[k]) / max(n - 1, 1) for k in cpu0},
    }


# --topology names: (coordinator topology, ring_steps)
TOPOLOGIES = {"star": ("star", False), "chain": ("chain", True), "chain-no-ring": ("chain", False)}


def floor_baseline(engine: InProcess, max_tokens: int, pin: bool) -> list[float]:
    """The whole model decoding as the floors do (from position 0, every call from one loop, no hand-off), pinned
    to one core with --pin as each floor stage is; seconds per token. It runs on the runtime's own thread, whose
    OpenMP team the in-process requests use too (a second team on this thread would spin beside the floors)."""

    def decode() -> list[float]:
        everywhere = os.sched_getaffinity(0)  # NOTE: this thread's
        if pin:
            os.sched_setaffinity(0, {min(everywhere)})
        try:
            return in_process_times(engine.rt, 1, max_tokens)
        finally:
            os.sched_setaffinity(0, everywhere)

    return engine.rt.run(decode)


def link_crossings(v: ChatLoopVariant, n_stages: int) -> int:
    """Links a decode step crosses: 2 x N in the star, N + 1 in the chain, N with ring steps."""
    if v.topology == "star":
        return 2 * n_stages
    return n_stages if v.ring_steps(n_stages) else n_stages + 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=pathlib.Path, help="converted model (default: the demo model in 2 stages)")
    p.add_argument("--gguf", type=pathlib.Path, help="the whole GGUF for the in-process side (default: the demo's)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads, in-process and per stage (default 2)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per request (default 128)")
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions; medians reported (default 5)")
    p.add_argument("--served", default="spin20000,default,passive,t1:spin20000",
                   help="served configurations, all up at once and measured in turn: the stages' OpenMP waiting "
                        "(spin<N> = GOMP_SPINCOUNT=N, passive = OMP_WAIT_POLICY=PASSIVE, default = both unset), "
                        "optionally with a thread count per stage as t1:default "
                        "(default: spin20000,default,passive,t1:spin20000)")  # fmt: skip
    p.add_argument("--topology", default="star",
                   help="data planes to measure, each with every --served configuration: some of star, chain "
                        "(ring steps, the coordinator's default) and chain-no-ring (default star)")  # fmt: skip
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="one-way delay on every link through a delay proxy in front of each stage (default 0)")  # fmt: skip
    p.add_argument("--stages", type=int, default=2, help="stages of the demo model when no --model-dir (default 2)")
    p.add_argument("--pin", action="store_true",
                   help="pin stage K to core K (performance.cpu_cores), the like-for-like setting with --served t1:... "
                        "against --threads 1 in-process")  # fmt: skip
    p.add_argument("--coordinator-nice", default="serve",
                   help="niceness of the coordinator process, each value a configuration of its own, e.g. 0,10: "
                        "does the coordinator's Python work delay the stages' decodes on shared cores? serve = as "
                        "chatloop serve sets it (10 with --pin, else 0; the default)")  # fmt: skip
    p.add_argument("--coordinator-cores", default="",
                   help="cores to pin the coordinator to (taskset -c), each value a configuration of its own, "
                        "'-' = not pinned, e.g. -,1: does the coordinator's turn delay stage 0 on its core? "
                        "The benchmark's client then runs there too (default: not pinned)")  # fmt: skip
    p.add_argument("--event-loop", default="",
                   help="the processes' event loops to compare, each a configuration of its own: uvloop, asyncio "
                        "or uvloop,asyncio (default: the servers' default, uvloop when installed)")  # fmt: skip
    p.add_argument("--checkouts", default="",
                   help="other checkouts of this repository whose processes to run as configurations of their own "
                        "beside this one's ('' or . = this one), e.g. /tmp/before,. (their C extension built)")  # fmt: skip
    p.add_argument("--floor", default="",
                   help="also run the stages as bench_pipeline_floor.py does (one blocking loop each, pinned as "
                        "--pin says, no event loop, no coordinator), each value a configuration of its own: "
                        "pipe/raw (hidden states over pipes: the fastest a pipeline of these stage processes decodes "
                        "here) or tcp/chain (served chain frames over loopback TCP, decoded and checked), e.g. "
                        "pipe/raw,tcp/chain")  # fmt: skip
    p.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    exit_on_sigterm()
    topologies = [t.strip() for t in args.topology.split(",") if t.strip()]
    if not topologies or any(t not in TOPOLOGIES for t in topologies):
        p.error(f"--topology: expected some of {','.join(TOPOLOGIES)}, got {args.topology!r}")
    try:
        nices = [None if x.strip() == "serve" else int(x) for x in args.coordinator_nice.split(",") if x.strip()]
    except ValueError:
        p.error(f"--coordinator-nice: expected integers or serve like serve,0,10, got {args.coordinator_nice!r}")
    nices = nices or [None]
    coordinator_cores = [("" if x.strip() == "-" else x.strip()) for x in args.coordinator_cores.split(",")] or [""]
    for cores in filter(None, coordinator_cores):
        try:
            parse_cpu_list(cores)
        except ValueError as exc:
            p.error(f"--coordinator-cores: {exc}")
    loops = [x.strip() for x in args.event_loop.split(",") if x.strip()]
    if any(x not in ("uvloop", "asyncio") for x in loops):
        p.error(f"--event-loop: expected uvloop, asyncio or uvloop,asyncio, got {args.event_loop!r}")
    loops = loops or [""]
    try:
        checkouts = parse_checkouts(args.checkouts)
    except ValueError as exc:
        p.error(str(exc))
    variants = [
        dataclasses.replace(
            v,
            topology=TOPOLOGIES[t][0],
            ring=TOPOLOGIES[t][1],
            delay_ms=args.delay_ms,
            pin=args.pin,
            coordinator_nice=nice,
            coordinator_cores=cores,
            event_loop=loop,
            checkout=c,
        )
        for v in parse_served(args.served, args.threads)
        for t in topologies
        for nice in nices
        for cores in coordinator_cores
        for loop in loops
        for c in checkouts
    ]
    from chatloop.engine.tokenizer import Tokenizer  # noqa: PLC0415

    model_dir = args.model_dir or demo_model_dir(args.stages)
    gguf = args.gguf or demo_gguf()
    tok = Tokenizer(gguf)
    prompt = tok.tokenize(PROMPT)
    tok.close()
    n_stages = len(load_manifest(model_dir).stages)
    names = [
        f"{v.topology}{' no-ring' if v.topology == 'chain' and v.ring is False else ''}"
        f" {v.threads}t{' pinned' if v.pin else ''}"
        f", OMP {v.omp}"
        + (f", coordinator nice {v.coordinator_nice}" if v.coordinator_nice is not None else "")
        + (f", coordinator@{v.coordinator_cores}" if v.coordinator_cores else "")
        + (f", {v.event_loop}" if v.event_loop else "")
        + (f", @{pathlib.Path(v.checkout).name}" if v.checkout else "")
        for v in variants
    ]
    # NOTE: a checkout from before ring steps crosses n_stages + 1 links in its "chain" too
    crossings = {n: link_crossings(v, n_stages) for n, v in zip(names, variants)}

    served: dict[str, list[dict]] = {n: [] for n in names}
    local: list[dict] = []
    floors = (
        comma_list(p, "--floor", args.floor, ("pipe/raw", "pipe/chain", "tcp/raw", "tcp/chain")) if args.floor else []
    )
    floor_ms: dict[str, list[float]] = {f: [] for f in floors}
    floor_cpu: dict[str, list[list[float]]] = {f: [] for f in floors}  # per run: each stage's CPU ms per token
    # NOTE: the floors decode from position 0 after a one-token prompt, with no hand-off to a decode thread: their
    # ratios are taken against the whole model decoding the same way (bench_pipeline_floor.py's in-process side), not
    # against the served request's baseline, whose decodes run after the prompt and through the runtime's thread
    floor_base: list[float] = []
    with workdir() as tmp:
        children = Children(pathlib.Path(tmp))
        engine = None
        pipelines: dict[str, Pipeline] = {}
        try:
            clusters = [ChatLoopCluster(children, model_dir, v, pathlib.Path(tmp)).start() for v in variants]
            engine = InProcess(gguf, args.threads)
            for f in floors:
                link, fmt = f.split("/")
                # NOTE: the stages' OpenMP waiting as the first served configuration's: with several threads a stage
                # on shared cores, OpenMP's default spinning makes two teams fight over the cores (0.57 x instead of
                # 0.85 x in-process, 1B-class model, 2 threads a stage)
                env = omp_env(variants[0].omp)
                pipelines[f] = Pipeline(model_dir, args.threads, "sleep", link, fmt == "chain", args.pin, env)
                pipelines[f].generate(16)
            # Warm-up: page the weights in, size the compute buffers, open the keep-alive connections.
            for cluster in clusters:
                asyncio.run(served_once(cluster.url, prompt, 16))
            engine.generate(prompt, 16)
            for rep in range(args.reps):
                r = engine.generate(prompt, args.max_tokens)
                local.append({"tokens": r.tokens, "ttft_ms": 1000 * r.ttft, "decode_ms": decode_ms(r),
                              "cpu_ms": engine.decode_cpu_ms})  # fmt: skip
                line = f"rep {rep + 1}/{args.reps}: in-process {local[-1]['decode_ms']:.2f} ms/token"
                for name, cluster in zip(names, clusters):
                    served[name].append(measure_served(cluster, prompt, args.max_tokens))
                    line += f", {name} {served[name][-1]['decode_ms']:.2f}"
                if pipelines:
                    floor_base.append(1000 * statistics.mean(floor_baseline(engine, args.max_tokens, args.pin)))
                    line += f", floor's in-process {floor_base[-1]:.2f}"
                for f, pipeline in pipelines.items():
                    floor_ms[f].append(1000 * statistics.mean(pipeline.generate(args.max_tokens)))
                    floor_cpu[f].append(pipeline.cpu_ms)
                    line += f", floor {f} {floor_ms[f][-1]:.2f}"
                log.info(line)
        finally:
            if engine:
                engine.close()
            for pipeline in pipelines.values():
                pipeline.close()
            children.stop()

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    l_dec, l_ttft = med(local, "decode_ms"), med(local, "ttft_ms")
    omp = (
        " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ) or "default"
    )
    delay = f", {args.delay_ms:g} ms one-way delay on every link" if args.delay_ms else ""
    print(
        f"\n{gguf.name}: {n_stages} stages served ({', '.join(topologies)}) vs the whole model in this process "
        f"({args.threads} threads, OpenMP {omp}{delay}); prompt {len(prompt)} tokens, {local[0]['tokens']} "
        f"generated; median of {args.reps} alternating repetitions\n"
    )
    header = (
        f"{'':<30} {'TTFT ms':>8} {'ms/token':>9} {'tok/s':>7} {'x in-proc':>9} {'link ms':>7} {'stage ms':>8} "
        f"{'other ms':>8} {'paired':>7}"
    )
    print(header)
    print("-" * len(header))
    print(f"{'in-process (whole GGUF)':<30} {l_ttft:>8.1f} {l_dec:>9.2f} {1000 / l_dec:>7.1f} {1.0:>9.3f}")
    if floors:
        b_dec = statistics.median(floor_base)
        print(f"{'in-process, as the floors':<30} {'':>8} {b_dec:>9.2f} {1000 / b_dec:>7.1f} {1.0:>9.3f}")
    for f, values in floor_ms.items():
        f_dec = statistics.median(values)
        paired = statistics.median(b / v for b, v in zip(floor_base, values))
        print(f"{'floor ' + f:<30} {'':>8} {f_dec:>9.2f} {1000 / f_dec:>7.1f} {b_dec / f_dec:>9.3f}"
              f" {(f_dec - b_dec) / n_stages:>7.2f} {'':>8} {'':>8} {paired:>7.3f}")  # fmt: skip
    summary = {}
    for name, rows in served.items():
        s_dec, s_ttft = med(rows, "decode_ms"), med(rows, "ttft_ms")
        compute, queue = med(rows, "stage_compute_ms"), med(rows, "stage_queue_ms")
        hop = (s_dec - l_dec) / crossings[name]
        cpu = {k: statistics.median(r["cpu_ms_per_token"][k] for r in rows) for k in rows[0]["cpu_ms_per_token"]}
        paired = statistics.median(b["decode_ms"] / r["decode_ms"] for b, r in zip(local, rows))
        summary[name] = {"decode_ms": s_dec, "ttft_ms": s_ttft, "ratio": l_dec / s_dec, "paired_ratio": paired,
                         "per_crossing_ms": hop, "crossings": crossings[name],
                         "stage_compute_ms": compute, "stage_queue_ms": queue, "cpu_ms_per_token": cpu}  # fmt: skip
        print(
            f"{name:<30} {s_ttft:>8.1f} {s_dec:>9.2f} {1000 / s_dec:>7.1f} {l_dec / s_dec:>9.3f} {hop:>7.2f}"
            f" {compute:>8.2f} {s_dec - compute - queue:>8.2f} {paired:>7.3f}"
        )
    print(
        f"""
  ms/token  steady decode: (last token - first token) / (tokens - 1), as the client sees the stream
  link ms   overhead per link crossing = (served ms/token - in-process ms/token) / crossings per token:
            {2 * n_stages} in the star (coordinator -> stage -> coordinator for each stage), {n_stages + 1} in the chain
            without ring steps (coordinator -> stage 0 -> ... -> last stage -> coordinator), {n_stages} with them (stage
            0 -> ... -> last stage -> stage 0). With --delay-ms it includes the delay; it also carries the chain's own
            compute cost (one llama_decode per stage instead of one in all)
  paired    the median over repetitions of in-process / served ms/token, each pair measured back to back: steadier
            than the ratio of medians when the machine's speed drifts during the run
  stage ms  the stages' own llama_decode time per decode step (the prompt's calls subtracted), summed over stages
  other ms  ms/token - stage ms - stage queue wait: HTTP, frames, coordinator scheduling, SSE streaming
  floor     (--floor) the stages in blocking loops (pinned as --pin says, OpenMP waiting as the first --served
            configuration's), no event loop, no coordinator, from position 0 after a one-token prompt: their ratio
            is to the whole model decoding the same way ("in-process, as the floors": one loop, no hand-off)
            (bench_pipeline_floor.py): pipe/raw = hidden states over pipes, what a crossing costs without ChatLoop;
            tcp/chain = the served chain frames over loopback TCP, decoded and checked, ring steps as served
  CPU ms    per decoded token, each process's user + system time (for the served stages, the prompt's, measured
            by a one-token request, subtracted): where wall time swings with the machine, CPU time shows the work"""
    )
    print(f"  CPU ms per token, in-process: {med(local, 'cpu_ms'):.2f}")
    for name, s in summary.items():
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in s["cpu_ms_per_token"].items())
        print(f"  CPU ms per token, {name}: {cpu}")
    for f, runs in floor_cpu.items():
        cpu = ", ".join(f"stage-{k} {statistics.median(col):.2f}" for k, col in enumerate(zip(*runs)))
        print(f"  CPU ms per token, floor {f}: {cpu}")
    for star_name, v in zip(names, variants):
        if v.topology != "star":
            continue
        chain_name = star_name.replace("star ", "chain ", 1)
        if chain_name in summary:
            st, ch = summary[star_name], summary[chain_name]
            print(
                f"  chain / star ({v.threads}t, OMP {v.omp}): ms/token {ch['decode_ms'] / st['decode_ms']:.3f}, "
                f"tok/s {st['decode_ms'] / ch['decode_ms']:.3f}, TTFT {ch['ttft_ms'] / st['ttft_ms']:.3f}"
            )
    if args.delay_ms:
        for (name, row), v in zip(summary.items(), variants):
            allowed = 2 * n_stages if v.topology == "star" else n_stages + 1  # issue 14's bound: N + 1 in the chain
            bound = (l_dec + allowed * args.delay_ms) * 1.10
            verdict = "within" if row["decode_ms"] <= bound else "above"
            print(
                f"  {name}: {row['decode_ms']:.2f} ms/token {verdict} in-process + {allowed} x "
                f"{args.delay_ms:g} ms + 10 % = {bound:.2f}"
            )
    best_name = max(summary, key=lambda n: summary[n]["ratio"])
    ratio = summary[best_name]["ratio"]
    verdict = "meets" if ratio >= 0.90 else "misses"
    paired = summary[best_name]["paired_ratio"]
    print(f"\nbest served decode ({best_name}) = {ratio:.3f} x in-process (paired {paired:.3f}): {verdict} the target "
          "of >= 0.90 x")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": str(gguf),
                    "threads": args.threads,
                    "stages": n_stages,
                    "delay_ms": args.delay_ms,
                    "in_process": local,
                    "served": served,
                    "floors": {f: {"decode_ms": floor_ms[f], "cpu_ms_per_token": floor_cpu[f]} for f in floors},
                    "floor_baseline_ms": floor_base,
                    "summary": summary,
                },
                indent=2,
            )  # fmt: skip
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
