#!/usr/bin/env python3
"""``wire_dtype: f16`` against f32: bytes per token on the wire and how far the logits move.

Runs the stages of a converted model (default: the demo model in 2 stages) in this process (``LocalChain``), greedy,
twice over the same tokens: once passing the hidden rows between stages as float32 (bit-exact with the whole model),
once rounded to float16 and back, as a stage does when the coordinator asks for ``wire_dtype: f16``. The f16 run is
fed the f32 run's tokens, so every step compares the same positions. Printed: the size of a one-token chain frame
between two stages in each dtype, the largest |Δ logit| over the run and at how many steps the greedy token differs.

    .venv/bin/python scripts/bench_wire_dtype.py --tokens 64
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import benchlib  # noqa: F401 - puts the repository on sys.path
import numpy as np

from chatloop.demo import demo_model_dir
from chatloop.engine.local_chain import LocalChain
from chatloop.protocol.chain import encode_chain
from chatloop.protocol.messages import SeqStep

PROMPTS = [
    "Explain how a steam engine works, step by step:",
    "Write a short story about a lighthouse keeper and a storm.",
    "List five uses of copper and why each one depends on its properties:",
]


def run(chain: LocalChain, prompt: list[int], tokens: int, dtype, forced: list[int] | None) -> tuple[list, list]:
    """Greedy tokens and last-stage logits per step; hidden rows cross every stage boundary as ``dtype``."""
    out_tokens, out_logits = [], []
    feed, pos = list(prompt), 0
    try:
        for i in range(tokens):
            step = SeqStep(0, pos, len(feed), sample=True)
            data = np.asarray(feed, dtype=np.int32)
            for k, st in enumerate(chain.stages):
                data = st.run(st.forward, [step], data)
                if k < len(chain.stages) - 1:
                    data = np.asarray(data).astype(dtype).astype(np.float32)
            out_logits.append(chain.stages[-1].logits(-1).copy())
            out_tokens.append(data[0].token)
            pos += len(feed)
            feed = [forced[i] if forced else data[0].token]
    finally:
        chain.release(0)
    return out_tokens, out_logits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=pathlib.Path, help="converted model (default: the demo model, 2 stages)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    args = ap.parse_args()
    model_dir = args.model_dir or demo_model_dir(2)
    worst, differ, steps = 0.0, 0, 0
    with LocalChain(model_dir) as chain:
        n_embd = chain.stages[0].n_embd
        row = np.zeros((1, n_embd), dtype=np.float32)
        wire = {"f32": row, "f16": row.astype(np.float16)}
        size = {
            k: len(encode_chain("c0", 1, 1, [{"seq": 0, "pos": 0, "n": 1}], [[0, 0]], [1], v, k))
            for k, v in wire.items()
        }
        for text in PROMPTS:
            prompt = chain.tokenizer.tokenize(text)
            ref_tokens, ref_logits = run(chain, prompt, args.tokens, np.float32, None)
            half_tokens, half_logits = run(chain, prompt, args.tokens, np.float16, ref_tokens)
            for a, b, ta, tb in zip(ref_logits, half_logits, ref_tokens, half_tokens):
                worst = max(worst, float(np.abs(a - b).max()))
                differ += int(ta != tb)
                steps += 1
            print(f"{text[:40]!r:44} max |Δ logit| so far {worst:.4f}")
    print(
        f"\n{model_dir.name}: one-token chain frame between stages: f32 {size['f32']} bytes, f16 {size['f16']} bytes "
        f"({size['f16'] / size['f32']:.2f} x)\nover {steps} greedy steps ({len(PROMPTS)} prompts x {args.tokens}): "
        f"max |Δ logit| f16 vs f32 = {worst:.4f}; greedy token differs at {differ} step(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
