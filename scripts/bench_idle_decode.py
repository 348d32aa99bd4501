"""Why a served stage decodes slower than the same stage in a loop: the cost of an idle gap before a decode.

In a served pipeline every stage waits while the other stages decode and the hops run, so each of its
decodes starts after an idle gap of several milliseconds; in one process running the whole model, decodes
follow each other back to back. This script decodes one token at a time through one stage file (the
first stage of the demo model by default) with idle gaps of 0, 2, 5 and 10 ms between decodes (sleeping,
as a waiting stage does, spinning on one core, or sleeping while a SCHED_IDLE busy loop keeps this process's
cores from going idle), interleaved, and prints the median decode time of each. The difference is what idle
cores, sleeping llama.cpp threads and cold caches cost per stage and token.

    .venv/bin/python scripts/bench_idle_decode.py
    .venv/bin/python scripts/bench_idle_decode.py --stage path/to/stage-1.gguf --threads 2
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib.idle_loop import idle_loop  # noqa: E402

from chatloop.demo import demo_model_dir  # noqa: E402
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime  # noqa: E402
from chatloop.modelfiles.manifest import load_manifest  # noqa: E402
from chatloop.protocol.messages import SeqStep  # noqa: E402

GAPS_MS = (0.0, 2.0, 5.0, 10.0)


SLEEP, SPIN, IDLE_LOOP = "sleeping", "spinning one core", "sleeping, SCHED_IDLE loop on the cores"


def idle(gap_s: float, spin: bool) -> None:
    if spin:
        end = time.perf_counter() + gap_s
        while time.perf_counter() < end:
            pass
    elif gap_s:
        time.sleep(gap_s)


def idle_loops() -> list[subprocess.Popen]:
    """A SCHED_IDLE busy loop (``benchlib.idle_loop``) on each core this process may use."""
    return [idle_loop(c) for c in sorted(os.sched_getaffinity(0))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=pathlib.Path, help="a stage GGUF (default: stage 0 of the demo model)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--tokens", type=int, default=60, help="decodes per gap and repetition (default 60)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    args = p.parse_args(argv)
    path = args.stage
    if path is None:
        model_dir = demo_model_dir(2)
        path = model_dir / load_manifest(model_dir).stages[0].file
    entry = next((s for s in load_manifest(path.parent).stages if s.file == path.name), None)
    role = StageRole(first=entry.has_embedding, last=entry.has_head) if entry else StageRole(True, True)
    rt = StageRuntime(path, role, RuntimeOptions(n_threads=args.threads, max_sequences=2))
    hidden = np.zeros((1, rt.n_embd), np.float32)
    cases = [(g, SLEEP) for g in GAPS_MS] + [(5.0, SPIN), (5.0, IDLE_LOOP)]
    times: dict[tuple[float, str], list[float]] = {c: [] for c in cases}
    try:
        for _ in range(args.reps):
            for gap_ms, mode in cases:
                rt.run(rt.release_all)
                loops = idle_loops() if mode == IDLE_LOOP else []
                for pos in range(args.tokens):
                    idle(gap_ms / 1000, mode == SPIN)
                    step = SeqStep(1, pos, 1, sample=role.last)
                    data = np.array([5], np.int32) if role.first else hidden
                    start = time.perf_counter()
                    rt.run(rt.forward, [step], data)
                    times[(gap_ms, mode)].append(time.perf_counter() - start)
                for loop in loops:
                    loop.kill()
                    loop.wait()
    finally:
        rt.close()
    base = statistics.median(times[(0.0, SLEEP)])
    print(f"{path.name}: one-token decodes, {args.threads} threads, median of {args.reps} x {args.tokens}")
    print(f"{'idle gap before each decode':46} {'ms/decode':>10} {'x back-to-back':>15}")
    for (gap_ms, mode), values in times.items():
        label = "none (back to back)" if not gap_ms else f"{gap_ms:g} ms {mode}"
        med = statistics.median(values)
        print(f"{label:46} {med * 1e3:10.2f} {med / base:15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
