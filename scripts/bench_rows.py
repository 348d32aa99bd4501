"""What more rows in one decode cost: by quantization, and for sequences at consecutive vs scattered KV slots.

Two figures the speculation policy and the batching depend on, measured on stage 0 of the demo model:

- **rows of one sequence** (a speculative verify step: the last token plus proposals): time of a decode of 1, 2,
  4 and 8 rows against 1 row, for each quantization given (the demo requantized by ``chatloop convert --quant``;
  on x86 llama.cpp computes Q4_0 and Q8_0 rows in tiled or repacked kernels, Q4_1 one row at a time);
- **one row each of several sequences** at consecutive slots (0-3) and at scattered slots (0, 2, 4, 6): llama.cpp
  puts only consecutive sequence ids into one ubatch (chatloop/engine/slots.py), so scattered ones take one pass
  over the weights each.

Cases are interleaved and medians printed; nothing passes or fails.

    .venv/bin/python scripts/bench_rows.py
    .venv/bin/python scripts/bench_rows.py --quant keep,q4_0,q8_0 --threads 2
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatloop.demo import demo_model_dir  # noqa: E402
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime  # noqa: E402
from chatloop.modelfiles.manifest import load_manifest  # noqa: E402
from chatloop.protocol.messages import SeqStep  # noqa: E402

ROWS = (1, 2, 4, 8)
SLOT_SETS = {"consecutive 0-3": (0, 1, 2, 3), "scattered 0,2,4,6": (0, 2, 4, 6), "one sequence": (0,)}


def stage0(quant: str) -> pathlib.Path:
    model_dir = demo_model_dir(2, quant)
    return model_dir / load_manifest(model_dir).stages[0].file


def timed(rt: StageRuntime, steps: list[SeqStep]) -> float:
    n = sum(s.n_tokens for s in steps)
    start = time.perf_counter()
    rt.forward(steps, np.full(n, 7, np.int32))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", default="keep,q4_0,q8_0", help="demo quantizations (default keep,q4_0,q8_0)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    p.add_argument("--reps", type=int, default=40, help="interleaved repetitions (default 40)")
    args = p.parse_args(argv)
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    opts = RuntimeOptions(n_threads=args.threads, kv_cache_mb=64, max_sequences=8)
    runtimes = {q: StageRuntime(stage0(q), StageRole(first=True, last=False), opts) for q in quants}
    try:
        pos: dict[tuple[str, int], int] = {}
        for q, rt in runtimes.items():
            # Sequence id s sits at slot s: they arrive together, in this order (slots.pick_slot).
            rt.forward([SeqStep(s, 0, 8) for s in range(8)], np.full(64, 5, np.int32))
            pos.update({(q, s): 8 for s in range(8)})
        rows_t = {(q, n): [] for q in quants for n in ROWS}
        slots_t = {(q, name): [] for q in quants for name in SLOT_SETS}
        for _ in range(args.reps):
            for q, rt in runtimes.items():
                for n in ROWS:
                    # The same positions every time (rows past them are rewound), as a verify step's are.
                    rows_t[(q, n)].append(timed(rt, [SeqStep(7, pos[(q, 7)], n)]))
                for name, ids in SLOT_SETS.items():
                    slots_t[(q, name)].append(timed(rt, [SeqStep(s, pos[(q, s)], 1) for s in ids]))
                    for s in ids:
                        pos[(q, s)] += 1
        print(f"stage 0 of the demo model, {args.threads} thread(s), median of {args.reps}; ms and x one row")
        print(f"{'quant':>6} " + " ".join(f"{f'{n} rows':>16}" for n in ROWS))
        for q in quants:
            one = statistics.median(rows_t[(q, 1)])
            cells = [statistics.median(rows_t[(q, n)]) for n in ROWS]
            print(f"{q:>6} " + " ".join(f"{1000 * c:8.2f} ({c / one:4.2f}x)" for c in cells))
        print("\none row each of several sequences (ms, and x one sequence)")
        print(f"{'quant':>6} " + " ".join(f"{name:>22}" for name in SLOT_SETS))
        for q in quants:
            one = statistics.median(slots_t[(q, "one sequence")])
            cells = [statistics.median(slots_t[(q, name)]) for name in SLOT_SETS]
            print(f"{q:>6} " + " ".join(f"{1000 * c:14.2f} ({c / one:4.2f}x)" for c in cells))
    finally:
        for rt in runtimes.values():
            rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
