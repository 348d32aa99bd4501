"""Load benchmark: ChatLoop under concurrent streaming requests against llama.cpp's own server and a
one-at-a-time in-process baseline, on the same model, thread budget and requests, in the same run.

For every concurrency level (default 1, 2, 4, 8, 16) a closed-loop aiohttp client keeps that many
streamed greedy ``/v1/completions`` requests open (each client sends its next request when the previous
one ends) until ``max(min-requests, waves x concurrency)`` requests are served; prompts (8 fixed texts of
6 to 133 tokens, sent as token ids) go round-robin, each made unique by a leading serial number so that
llama-server cannot reuse a cached prompt prefix, each asking for ``--max-tokens`` (the texts are chosen to
run that long; the figures use the tokens actually generated). Measured against each other, in this
order at every level:

- ChatLoop: one process per stage plus the coordinator (the configuration flags below);
- llama-server: the whole GGUF, ``-np <concurrency>`` slots, continuous batching, ``-t <threads>``;
- sequential: the whole GGUF in this process (``StageRuntime``, llama-cpp-python's low-level API) serving
  the same requests one after another; TTFT includes the wait for the requests before it.

Figures: aggregate generated tokens/s (all tokens / wall time), TTFT p50/p95 (sent -> first text chunk)
and inter-token latency p50/p95 (gaps between text chunks of a stream). A table is printed and a PNG
plot written. ``--variants`` instead compares ChatLoop configurations at one concurrency, each followed
by llama-server on the same requests, and reports each as a ratio to it (the machine is shared, so ratios
of neighbouring runs are steadier than raw numbers).

    .venv/bin/python scripts/bench_load.py                       # LLAMA_SERVER=... or a cached build
    .venv/bin/python scripts/bench_load.py --build-llama-server  # build it once into ~/.cache/chatloop
    .venv/bin/python scripts/bench_load.py --variants            # the configuration sweep at concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from benchlib.children import Children, exit_on_sigterm, workdir  # noqa: E402
from benchlib.cluster import ChatLoopCluster, ChatLoopVariant, add_variant_args, variant_from_args  # noqa: E402
from benchlib.in_process import InProcess  # noqa: E402
from benchlib.llama_server import LlamaServer, build_llama_server, find_llama_server  # noqa: E402
from benchlib.load import LoadResult, UniquePrompts, run_load, sequential_load  # noqa: E402
from benchlib.omp import omp_env  # noqa: E402
from benchlib.stats import counters_delta, stage_counters  # noqa: E402

from chatloop.demo import demo_gguf, demo_model_dir  # noqa: E402

log = logging.getLogger("bench_load")

# Fixed prompts of different lengths, each of which SmolLM2-135M-Instruct continues for 64+ tokens greedily.
PROMPTS = [
    "The history of the Roman Empire",
    "Explain how a steam engine works, step by step:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List ten tips for staying productive when working from home, and explain each one in a sentence or two:",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize "
    "foods from carbon dioxide and water. Describe the light-dependent reactions and the Calvin cycle in detail, "
    "including where each takes place in the chloroplast:",
    "Dear hiring manager, I am writing to apply for the position of software engineer at your company. In my "
    "previous role at a mid-sized logistics firm I led a team of four developers that rebuilt the route planning "
    "service, cut its latency by half and moved it from a monolith to a set of small services. I would like to "
    "tell you more about",
    "The following is a detailed travel guide to Japan. It covers the best time to visit, how to get around by "
    "train, what to eat in Tokyo, Kyoto and Osaka, which temples and shrines are worth a detour, how to behave in "
    "an onsen, and how much money a traveller should budget per day. Chapter 1: When to go.",
    "Report of the town council meeting. The meeting opened at seven in the evening with the mayor in the chair "
    "and eleven of the thirteen councillors present. The minutes of the previous meeting were read and approved "
    "without changes. The treasurer then presented the quarterly accounts: income from local taxes was slightly "
    "above the forecast, while spending on road repairs had run over budget because of the long winter and the "
    "flooding of the river road in March. Several councillors asked why the repair contract had not been put out "
    "to tender again, and the treasurer promised a written answer. The second item on the agenda was the new "
    "library. The architect showed the revised plans, which",
]

# The fastest configuration found on the 2-core development machine (see scripts/README.md).
BEST = ChatLoopVariant(threads=2, pipeline_depth=1, window_ms=0.0, omp="spin20000")


def n_requests(args, concurrency: int) -> int:
    return max(args.min_requests, args.waves * concurrency)


def measure_chatloop(cluster: ChatLoopCluster, prompts, args, c: int) -> tuple[LoadResult, dict]:
    """One load run plus, per stage, how busy it was and how it batched (from the stages' /metrics)."""
    before = [stage_counters(u) for u in cluster.stage_urls]
    pids = list(cluster.pids.values())
    res = asyncio.run(run_load(cluster.url, prompts, n_requests(args, c), c, args.max_tokens, pids))
    diag = {}
    for k, (url, b) in enumerate(zip(cluster.stage_urls, before)):
        d = counters_delta(b, stage_counters(url))
        diag[f"stage{k}_busy"] = d["forward_s"] / res.wall  # share of the wall time spent in llama_decode
        diag[f"stage{k}_batch"] = d["batch_rows"] / max(d["batches"], 1)  # sequences per llama_decode
        diag[f"stage{k}_forward_ms"] = 1000 * d["forward_s"] / max(d["forwards"], 1)
        diag[f"stage{k}_passes"] = d["passes"] / max(d["forwards"], 1)  # passes over the weights per decode call
        diag[f"stage{k}_queue_ms"] = 1000 * d["queue_s"] / max(d["queued"], 1)
    return res, diag


def pooled(runs: list[tuple[LoadResult, dict]]) -> dict:
    """Summary of repeated runs: latencies pooled, tokens/s = all tokens / all wall time, diagnostics averaged."""
    load = LoadResult(
        [r for run, _ in runs for r in run.results], sum(run.wall for run, _ in runs), sum(run.cpu for run, _ in runs)
    )
    out = load.summary()
    out["tok_s_runs"] = [run.summary()["tok_s"] for run, _ in runs]
    for key in runs[0][1]:
        out[key] = sum(d[key] for _, d in runs) / len(runs)
    return out


def stage_line(s: dict) -> str:
    parts = []
    for k in range(8):
        if f"stage{k}_busy" not in s:
            break
        parts.append(
            f"stage {k}: busy {100 * s[f'stage{k}_busy']:.0f}%, {s[f'stage{k}_batch']:.1f} seqs/decode, "
            f"{s.get(f'stage{k}_passes', float('nan')):.2f} passes/decode, "
            f"{s[f'stage{k}_forward_ms']:.1f} ms/decode, queued {s[f'stage{k}_queue_ms']:.1f} ms"
        )
    return "; ".join(parts)


def fmt_row(name: str, s: dict, ref: dict | None = None) -> str:
    ratio = f"{s['tok_s'] / ref['tok_s']:>7.2f}" if ref else f"{'':>7}"
    return (
        f"  {name:<14} {s['tok_s']:>8.1f} {ratio} {s['ttft_p50_ms']:>9.0f} {s['ttft_p95_ms']:>9.0f}"
        f" {s['itl_p50_ms']:>8.1f} {s['itl_p95_ms']:>8.1f} {s['cpu_ms_per_tok']:>8.2f} {s['tokens']:>7d}"
        f" {s['errors']:>4d}"
    )


HEADER = (
    f"  {'server':<14} {'tok/s':>8} {'x llama':>7} {'TTFT p50':>9} {'TTFT p95':>9}"
    f" {'ITL p50':>8} {'ITL p95':>8} {'CPU ms/t':>8} {'tokens':>7} {'err':>4}"
)


def sweep(args, prompts, model_dir, gguf, binary, tmp: pathlib.Path, children: Children) -> dict:
    variant = variant_from_args(args)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    runs: dict[str, dict[int, list]] = {"chatloop": {}, "llama-server": {}, "sequential": {}}
    cluster = ChatLoopCluster(children, model_dir, variant, tmp).start()
    engine = InProcess(gguf, args.threads) if not args.no_sequential else None
    try:
        # Warm-up: page weights in, size compute buffers.
        asyncio.run(run_load(cluster.url, prompts, 4, 4, 8))
        if engine:
            engine.generate(prompts(), 8)
        # NOTE: repetitions go round all levels, so slow drifts of the shared machine fall on every level.
        for rep in range(args.reps):
            for c in levels:
                n = n_requests(args, c)
                got = {"chatloop": measure_chatloop(cluster, prompts, args, c)}
                if binary:
                    server = LlamaServer(children, binary, gguf, args.threads, c, omp=args.baseline_omp).start()
                    try:
                        asyncio.run(run_load(server.url, prompts, c, c, 8))  # warm-up
                        got["llama-server"] = (
                            asyncio.run(run_load(server.url, prompts, n, c, args.max_tokens, server.pids)),
                            {},
                        )
                    finally:
                        server.stop()
                if engine:
                    got["sequential"] = (sequential_load(engine, prompts, n, c, args.max_tokens), {})
                log.info("rep %d/%d, concurrency %d (%d requests):", rep + 1, args.reps, c, n)
                for name, run in got.items():
                    runs[name].setdefault(c, []).append(run)
                    s = run[0].summary()
                    log.info(
                        "  %-12s %7.1f tok/s  TTFT p50 %6.0f ms  ITL p50 %6.1f p95 %6.1f ms",
                        name, s["tok_s"], s["ttft_p50_ms"], s["itl_p50_ms"], s["itl_p95_ms"],
                    )  # fmt: skip
    finally:
        if engine:
            engine.close()
        cluster.stop()
    return {name: {c: pooled(r) for c, r in by_c.items()} for name, by_c in runs.items() if by_c}


def print_sweep(results: dict, args, variant: ChatLoopVariant) -> None:
    print(
        f"\nstreaming /v1/completions, temperature 0, max_tokens {args.max_tokens}, {len(PROMPTS)} prompts;"
        f" ChatLoop {variant.label} (2 stages); baselines {args.threads} threads\n"
    )
    levels = sorted({c for by_c in results.values() for c in by_c})
    for c in levels:
        print(f"concurrency {c}")
        print(HEADER)
        ref = results.get("llama-server", {}).get(c)
        for name, by_c in results.items():
            if c in by_c:
                print(fmt_row(name, by_c[c], ref))
        if c in results.get("chatloop", {}):
            print("    ChatLoop " + stage_line(results["chatloop"][c]))
    c = 8
    if c in results.get("chatloop", {}):
        cl = results["chatloop"][c]
        print(f"\ntargets at concurrency {c}:")
        if c in results.get("llama-server", {}):
            ls = results["llama-server"][c]
            r1 = cl["tok_s"] / ls["tok_s"]
            r3 = cl["itl_p95_ms"] / ls["itl_p95_ms"]
            print(f"  tokens/s vs llama-server   {r1:5.2f} x  (target >= 0.8)  {'met' if r1 >= 0.8 else 'MISSED'}")
            print(f"  ITL p95 vs llama-server    {r3:5.2f} x  (target <= 1.5)  {'met' if r3 <= 1.5 else 'MISSED'}")
            r4 = cl["cpu_ms_per_tok"] / ls["cpu_ms_per_tok"]
            print(f"  CPU per token vs llama-server {r4:5.2f} x  (no target; steadier than tok/s on a shared machine)")
        if c in results.get("sequential", {}):
            r2 = cl["tok_s"] / results["sequential"][c]["tok_s"]
            print(f"  tokens/s vs sequential     {r2:5.2f} x  (target >= 1.5)  {'met' if r2 >= 1.5 else 'MISSED'}")


def plot(results: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = {"chatloop": "tab:blue", "llama-server": "tab:orange", "sequential": "tab:green"}
    for name, by_c in results.items():
        cs = sorted(by_c)
        col = colors.get(name)
        axes[0].plot(cs, [by_c[c]["tok_s"] for c in cs], "o-", color=col, label=name)
        axes[1].plot(cs, [by_c[c]["ttft_p50_ms"] for c in cs], "o-", color=col, label=f"{name} p50")
        axes[1].plot(cs, [by_c[c]["ttft_p95_ms"] for c in cs], "s--", color=col, alpha=0.6, label=f"{name} p95")
        axes[2].plot(cs, [by_c[c]["itl_p50_ms"] for c in cs], "o-", color=col, label=f"{name} p50")
        axes[2].plot(cs, [by_c[c]["itl_p95_ms"] for c in cs], "s--", color=col, alpha=0.6, label=f"{name} p95")
    levels = sorted({c for by_c in results.values() for c in by_c})
    for ax, ylabel in zip(
        axes, ["aggregate generated tokens/s", "time to first token (ms)", "inter-token latency (ms)"]
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_variant(spec: str) -> ChatLoopVariant:
    """``threads/depth/window_ms/omp[/pin][/chain][/parts|/no-parts][/ring|/no-ring]``, e.g. ``2/1/0/spin20000`` or
    ``1/2/0/spin20000/pin/chain`` (omp: default, passive or spin<N>; pin: stage K pinned to core K modulo the cores;
    chain: ``topology: chain``; parts / no-parts: prompt chunks passed on in parts or not, default: only pinned;
    ring / no-ring: the chain with or without ring steps, default: as `chatloop serve`, only pinned)."""
    try:
        t, d, w, o, *rest = spec.split("/")
        omp_env(o)
        if not set(rest) <= {"pin", "chain", "parts", "no-parts", "ring", "no-ring"} or len(set(rest)) != len(rest):
            raise ValueError(spec)
        if {"parts", "no-parts"} <= set(rest) or {"ring", "no-ring"} <= set(rest):
            raise ValueError(spec)
        topology = "chain" if "chain" in rest else "star"
        parts = True if "parts" in rest else False if "no-parts" in rest else None
        return ChatLoopVariant(
            int(t),
            int(d),
            float(w),
            o,
            pin="pin" in rest,
            topology=topology,
            prompt_parts=parts,
            ring=True if "ring" in rest else False if "no-ring" in rest else None,
        )
    except ValueError:
        raise SystemExit(
            "--variant-list: expected threads/depth/window_ms/omp[/pin][/chain][/parts|/no-parts][/ring|/no-ring] like "
            "2/1/0/spin20000,"
            f" got {spec!r}"
        ) from None


def variants_list(args) -> list[ChatLoopVariant]:
    if args.variant_list:
        return [parse_variant(s) for s in args.variant_list.split(",") if s.strip()]
    if args.variants == "grid":
        return [
            ChatLoopVariant(t, d, w, o)
            for t, d, w, o in itertools.product((1, 2), (1, 2), (0.0, 3.0), ("default", "passive", "spin20000"))
        ]
    # One factor at a time around the best configuration.
    best = BEST
    out = [best]
    seen = {best.label}
    for change in (
        {"threads": 1},
        {"pipeline_depth": 2},
        {"threads": 1, "pipeline_depth": 2},
        {"window_ms": 3.0},
        {"omp": "default"},
        {"omp": "passive"},
    ):
        v = dataclasses.replace(best, **change)
        if v.label not in seen:
            seen.add(v.label)
            out.append(v)
    return out


def variant_sweep(args, prompts, model_dir, gguf, binary, tmp: pathlib.Path, children: Children) -> list[dict]:
    c = args.variant_concurrency
    n = n_requests(args, c)
    server = LlamaServer(children, binary, gguf, args.threads, c, omp=args.baseline_omp).start() if binary else None
    rows = []
    try:
        if server:
            asyncio.run(run_load(server.url, prompts, c, c, 8))
        for v in variants_list(args):
            cluster = ChatLoopCluster(children, model_dir, v, tmp).start()
            mine, ref = [], []
            try:
                asyncio.run(run_load(cluster.url, prompts, 4, 4, 8))  # warm-up
                for _ in range(args.reps):  # alternate with llama-server: ratios of neighbouring runs
                    mine.append(measure_chatloop(cluster, prompts, args, c))
                    if server:
                        ref.append((asyncio.run(run_load(server.url, prompts, n, c, args.max_tokens, server.pids)), {}))
            finally:
                cluster.stop()
            s = pooled(mine)
            r = pooled(ref) if ref else None
            if r:
                s["x_llama"] = statistics.median(a / b for a, b in zip(s["tok_s_runs"], r["tok_s_runs"]))
            rows.append({"variant": v.label, "config": dataclasses.asdict(v), "chatloop": s, "llama_server": r})
            if args.json:  # keep what is done so far should the run be interrupted
                args.json.write_text(json.dumps({"variants": rows, "partial": True}, indent=2))
            log.info(
                "%-26s %6.1f tok/s (llama-server %s); %s",
                v.label, s["tok_s"], f"{r['tok_s']:.1f}" if r else "-", stage_line(s),
            )  # fmt: skip
    finally:
        if server:
            server.stop()
    print(f"\nChatLoop configurations at concurrency {c} ({n} requests x {args.reps}, max_tokens {args.max_tokens});")
    print("every run alternates with llama-server on the same requests: x llama is the median ratio of neighbours\n")
    head = (
        f"  {'variant':<24} {'tok/s':>6} {'x llama':>7} {'TTFT p50':>8} {'ITL p50':>7} {'ITL p95':>7}"
        f" {'p95 x llama':>11} {'CPU ms/t':>8} {'busy s0/s1':>10} {'seqs/decode':>11}"
    )
    print(head)
    print("  " + "-" * (len(head) - 2))
    for row in sorted(rows, key=lambda row: -row["chatloop"].get("x_llama", row["chatloop"]["tok_s"])):
        s, r = row["chatloop"], row["llama_server"]
        x = f"{s['x_llama']:>7.2f}" if r else f"{'-':>7}"
        px = f"{s['itl_p95_ms'] / r['itl_p95_ms']:>11.2f}" if r else f"{'-':>11}"
        busy = f"{100 * s['stage0_busy']:.0f}%/{100 * s['stage1_busy']:.0f}%"
        batch = f"{s['stage0_batch']:.1f}/{s['stage1_batch']:.1f}"
        print(
            f"  {row['variant']:<24} {s['tok_s']:>6.1f} {x} {s['ttft_p50_ms']:>8.0f} {s['itl_p50_ms']:>7.1f}"
            f" {s['itl_p95_ms']:>7.1f} {px} {s['cpu_ms_per_tok']:>8.2f} {busy:>10} {batch:>11}"
        )
    if rows and rows[0]["llama_server"]:
        ls = [row["llama_server"] for row in rows]
        print(
            f"\n  llama-server over the sweep: {min(x['tok_s'] for x in ls):.1f} to {max(x['tok_s'] for x in ls):.1f}"
            f" tok/s, ITL p95 {min(x['itl_p95_ms'] for x in ls):.1f} to"
            f" {max(x['itl_p95_ms'] for x in ls):.1f} ms, CPU {min(x['cpu_ms_per_tok'] for x in ls):.2f} to"
            f" {max(x['cpu_ms_per_tok'] for x in ls):.2f} ms/token"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=pathlib.Path, help="converted model (default: the demo model in 2 stages)")
    p.add_argument("--gguf", type=pathlib.Path, help="the whole GGUF for the baselines (default: the demo's)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads of the baselines (default 2)")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="concurrency levels (default 1,2,4,8,16)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    p.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency (default 2)")
    p.add_argument("--reps", type=int, default=1,
                   help="repetitions (round all levels; with --variants, alternations per variant) (default 1)")  # fmt: skip
    p.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level (default 8)")
    add_variant_args(p, BEST)
    p.add_argument("--baseline-omp", default="default",
                   help="OpenMP waiting of llama-server and the in-process baseline: default (unset), passive or "
                        "spin<N> (default: default)")  # fmt: skip
    p.add_argument("--build-llama-server", action="store_true",
                   help="build llama-server from the llama-cpp-python sdist into the cache when none is found")  # fmt: skip
    p.add_argument("--no-llama-server", action="store_true", help="skip the llama-server baseline")
    p.add_argument("--no-sequential", action="store_true", help="skip the one-at-a-time in-process baseline")
    p.add_argument("--variants", nargs="?", const="oat", choices=["oat", "grid"],
                   help="compare ChatLoop configurations instead: oat = one factor at a time around the best "
                        "(default), grid = all 24 of threads x depth x window x OpenMP waiting")  # fmt: skip
    p.add_argument("--variant-list", help="with --variants: these configurations, threads/depth/window_ms/omp "
                   "separated by commas, e.g. 2/1/0/spin20000,1/2/3/passive,1/2/0/spin20000/pin/chain")  # fmt: skip
    p.add_argument("--variant-concurrency", type=int, default=8, help="concurrency of --variants (default 8)")
    p.add_argument("--plot", type=pathlib.Path, default=pathlib.Path("bench_load.png"), help="PNG to write")
    p.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    exit_on_sigterm()
    # NOTE: libgomp reads this when llama.cpp's libraries load: set or clear it before the first llama_cpp import.
    for key, value in omp_env(args.baseline_omp).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

    model_dir = args.model_dir or demo_model_dir(2)
    gguf = args.gguf or demo_gguf()
    binary = None
    if not args.no_llama_server:
        binary = find_llama_server()
        if binary is None and args.build_llama_server:
            binary = build_llama_server()
        if binary is None:
            log.warning("no llama-server (set LLAMA_SERVER or pass --build-llama-server): that baseline is skipped")
    from chatloop.engine.tokenizer import Tokenizer  # noqa: PLC0415

    tok = Tokenizer(gguf)
    prompts = UniquePrompts(PROMPTS, tok.tokenize)
    log.info("prompt lengths %s tokens; llama-server %s", [len(tok.tokenize(t)) for t in PROMPTS], binary or "-")

    started = time.perf_counter()
    out: dict = {"model": str(gguf), "threads": args.threads, "max_tokens": args.max_tokens}
    with workdir() as tmp:
        children = Children(pathlib.Path(tmp))
        try:
            if args.variants or args.variant_list:
                out["variants"] = variant_sweep(args, prompts, model_dir, gguf, binary, pathlib.Path(tmp), children)
            else:
                variant = variant_from_args(args)
                results = sweep(args, prompts, model_dir, gguf, binary, pathlib.Path(tmp), children)
                out["chatloop_variant"] = dataclasses.asdict(variant)
                out["results"] = {k: {str(c): s for c, s in v.items()} for k, v in results.items()}
                print_sweep(results, args, variant)
                title = (
                    f"{gguf.name}: ChatLoop 2 stages ({variant.label}) vs llama-server -np N vs sequential, "
                    f"{args.threads} threads, max_tokens {args.max_tokens}, {os.cpu_count()} cores"
                )
                plot(results, args.plot, title)
                print(f"\nplot written to {args.plot}")
        finally:
            children.stop()
            tok.close()
    print(f"total time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
