#!/usr/bin/env python3
"""How far ``prefix_cache_exact: false`` moves the logits: a chat's next turn from the cache against a full prefill.

With the default (exact) cache a next turn reuses only whole 64-token blocks of the previous prompt, computed as a
full prefill computes them, so its logits equal a full prefill's bit for bit (tests/test_engine_prefix.py). Not
exact, it also reuses the previous reply, whose positions were computed one row at a time (llama.cpp's row kernel)
where a full prefill of the new prompt computes them in 64-row blocks (the tiled kernel, another summation order).

This script runs that in one process on the whole model (demo SmolLM2-135M-Instruct Q4_1): turn 1 prefills a
prompt and generates ``--reply`` greedy tokens; turn 2 (the prompt, the reply and new text) is computed twice, from
the cached turn-1 sequence (copy its KV, compute the rest) and from scratch; both then continue ``--tokens``
greedy tokens, the cached run fed the full run's tokens so every step compares the same positions. Printed: the
largest |Δ logit| over those steps and at how many of them the greedy token differs, for several conversations.

    .venv/bin/python scripts/bench_prefix_drift.py
"""

from __future__ import annotations

import argparse
import sys

import benchlib  # noqa: F401 - puts the repository on sys.path
import numpy as np

from chatloop.demo import demo_gguf
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime
from chatloop.engine.tokenizer import Tokenizer
from chatloop.protocol.messages import BLOCK_ROWS, SeqStep
from chatloop.protocol.sampling import SamplingParams

GREEDY = SamplingParams()
SYSTEM = "You are the archivist of a lighthouse museum. Answer plainly and never guess a date. " * 6
QUESTIONS = [
    ("What did a keeper write about fog?", "And about storms?"),
    ("How was the lamp lit?", "Who cleaned the lens?"),
    ("Why did ships need the light?", "What happened when it failed?"),
    ("Describe the keeper's daily ledger.", "Was it ever lost?"),
]


def step(rt: StageRuntime, seq: int, pos: int, tokens: list[int], **kw) -> np.ndarray:
    rt.run(rt.forward, [SeqStep(seq, pos, len(tokens), True, GREEDY, **kw)], np.asarray(tokens, np.int32))
    return rt.run(rt.logits, -1).copy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reply", type=int, default=48, help="greedy tokens of turn 1")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens compared in turn 2")
    args = ap.parse_args()
    gguf = demo_gguf()
    tok = Tokenizer(gguf)
    rt = StageRuntime(gguf, StageRole(True, True), RuntimeOptions(n_threads=2, max_sequences=4, kv_cache_mb=256))
    worst, differ, steps = 0.0, 0, 0
    try:
        for first, second in QUESTIONS:
            p1 = tok.tokenize(f"{SYSTEM}\nQuestion: {first}\nAnswer:")
            logits = step(rt, 1, 0, p1)
            reply = []
            for _ in range(args.reply):  # turn 1's reply, one row at a time as a served decode computes it
                reply.append(int(np.argmax(logits)))
                logits = step(rt, 1, len(p1) + len(reply) - 1, reply[-1:])
            held = len(p1) + len(reply)  # positions sequence 1 holds
            p2 = p1 + reply + tok.tokenize(f"\nQuestion: {second}\nAnswer:", add_special=False)
            full = step(rt, 2, 0, p2)  # from scratch: whole blocks, then the last partial block row by row
            cached = step(rt, 3, held, p2[held:], prefix_from=1, block_end=held // BLOCK_ROWS * BLOCK_ROWS)
            for i in range(args.tokens):
                worst = max(worst, float(np.abs(full - cached).max()))
                differ += int(np.argmax(full) != np.argmax(cached))
                steps += 1
                nxt = [int(np.argmax(full))]
                full = step(rt, 2, len(p2) + i, nxt)
                cached = step(rt, 3, len(p2) + i, nxt)
            for seq in (1, 2, 3):
                rt.run(rt.release, seq)
            print(f"{first[:36]!r:40} max |Δ logit| so far {worst:.4f}", flush=True)
    finally:
        rt.close()
        tok.close()
    print(
        f"\nnot-exact cache hit vs full prefill over {steps} greedy steps ({len(QUESTIONS)} conversations, turn 1 reply "
        f"{args.reply} tokens): max |Δ logit| = {worst:.4f}; greedy token differs at {differ} step(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
