#!/usr/bin/env python3
"""Where a served token's time goes: one stream through the stage chain, timed at every hop of every step.

Starts the stages of a converted model (default: the demo model in 2 stages, each pinned to its own core with 1
thread, the like-for-like setting of ``bench_serve.py``) and a coordinator with ``CHATLOOP_STEP_TRACE`` set
(``chatloop/step_trace.py``): every process then records a monotonic timestamp at each mark of a step (the
coordinator starts the step and sends its frame; a stage receives the frame, has checked it, hands it to its
decode thread, which runs the forward call around ``llama_decode``; the result comes back to the event loop and is
sent on, with ring steps first to stage 0; the coordinator gets the reply). CLOCK_MONOTONIC is one clock for the whole machine, so the marks of all
processes form one timeline per step. Printed: the median time between consecutive marks over the steps of the
usual shape (a decode step of the lone stream), the decodes' share and the rest.

    .venv/bin/python scripts/bench_step_timeline.py
    .venv/bin/python scripts/bench_step_timeline.py --stages 3 --tokens 256
    .venv/bin/python scripts/bench_step_timeline.py --no-ring     # every step sent by the coordinator
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pathlib
import statistics
import sys
import time

import benchlib  # noqa: F401 - puts the repository on sys.path
from bench_step_cpu import load
from benchlib.children import Children, exit_on_sigterm, workdir
from benchlib.cluster import ChatLoopCluster, ChatLoopVariant

from chatloop import step_trace
from chatloop.demo import demo_model_dir


def read_marks(prefix: pathlib.Path, names: dict[int, str], since: int, until: int) -> list[tuple[int, str]]:
    """Every process's marks between ``since`` and ``until`` (ns), as (time, "process.mark"), in time order."""
    marks = []
    for pid, name in names.items():
        path = pathlib.Path(f"{prefix}.{pid}")
        for line in path.read_text().splitlines() if path.is_file() else []:
            mark, ns = line.split()
            if since <= int(ns) <= until:
                marks.append((int(ns), f"{name}.{mark}"))
    return sorted(marks)


def steps_of(marks: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """The timeline cut at each frame stage 0 receives. The coordinator's marks while stage 0 decodes are left out:
    with ring steps the coordinator takes a step over while the stages already compute it (off the token's path)."""
    steps: list[list[tuple[int, str]]] = []
    decoding = False
    for ns, mark in marks:
        if mark == "stage0.frame_in":
            steps.append([])
        decoding = (decoding or mark == "stage0.decode") and mark != "stage0.decode_end"
        if steps and not (decoding and mark.startswith("coordinator.")):
            steps[-1].append((ns, mark))
    return steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=pathlib.Path, help="converted model (default: the demo model)")
    ap.add_argument("--stages", type=int, default=2, help="stages of the demo model when no --model-dir (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per stage (default 1)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin stage K to core K")
    ap.add_argument("--no-ring", action="store_true", help="coordinator ring_steps off")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per request (default 128)")
    ap.add_argument("--requests", type=int, default=2, help="requests, one after another (default 2)")
    args = ap.parse_args()
    exit_on_sigterm()
    model_dir = args.model_dir or demo_model_dir(args.stages)
    with workdir() as tmp:
        prefix = pathlib.Path(tmp) / "marks"
        os.environ[step_trace.ENV] = str(prefix)  # NOTE: read by the children when they start
        children = Children(pathlib.Path(tmp))
        try:
            variant = ChatLoopVariant(
                threads=args.threads, pin=not args.no_pin, topology="chain", ring=not args.no_ring
            )
            cluster = ChatLoopCluster(children, model_dir, variant, pathlib.Path(tmp)).start()
            names = {pid: name.replace("-", "") for name, pid in cluster.pids.items()}  # stage-0 -> stage0
            asyncio.run(load(cluster.url, 1, 1, 8))  # warm-up
            since = time.monotonic_ns()
            tokens = asyncio.run(load(cluster.url, args.requests, 1, args.tokens))
            until = time.monotonic_ns()
        finally:
            children.stop()  # NOTE: the processes write their marks as they exit
        steps = steps_of(read_marks(prefix, names, since, until))
    shapes = collections.Counter(tuple(m for _, m in s) for s in steps)
    if not shapes:
        raise SystemExit("no marks were recorded (did the processes start with CHATLOOP_STEP_TRACE?)")
    shape, count = shapes.most_common(1)[0]
    usual = [s for s in steps if tuple(m for _, m in s) == shape]
    period = statistics.median((b[0][0] - a[0][0]) / 1e3 for a, b in zip(steps, steps[1:]))
    print(f"{tokens} tokens, {len(steps)} steps; {count} of the usual shape (a lone stream's decode step)\n")
    print(f"  {'from':>26} -> {'to':<26} {'median us':>9}")
    decode = other = 0.0
    for i in range(len(shape) - 1):
        us = statistics.median((s[i + 1][0] - s[i][0]) / 1e3 for s in usual)
        decode += us if shape[i].endswith(".decode") else 0.0
        print(f"  {shape[i]:>26} -> {shape[i + 1]:<26} {us:9.1f}")
    other = period - decode
    print(f"\n  step period {period:.1f} us: llama_decode {decode:.1f} us, everything else {other:.1f} us")
    print("  (everything else: frames, links, event loops, hand-offs, Python in the forward calls, and without ring")
    print("  steps the coordinator's turn between the last stage's result and the next frame)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
