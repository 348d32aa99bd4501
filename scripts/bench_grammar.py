"""Grammar sampler cost: greedy decoding with a JSON-schema grammar against the same decoding without one.

One process, one llama.cpp context, ``--concurrency`` sequences decoded together (one row each per step, as
the last stage runs them), each with its own sampler chain:

- free: greedy alone;
- first: llama.cpp's grammar sampler first in the chain, then greedy (``add_grammar``);
- late: greedy, then a one-token grammar check, re-picking with the grammar only when it refuses
  (``GrammarSampler``, llama-server's default).

Runs alternate (free, first, late, free, ...) so machine noise falls on all; the table gives medians of ms
per decode step (all sequences), of which the sampling part, and the ratio of tokens/s to free. A run stops
counting once any sequence ends, so every variant decodes the same batch size.

    .venv/bin/python scripts/bench_grammar.py                    # concurrency 1 and 8, the demo model
    .venv/bin/python scripts/bench_grammar.py --concurrency 4 --steps 48 --reps 5
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import statistics
import sys
import time

import llama_cpp as llama
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatloop.coordinator.chat_template import ChatTemplate  # noqa: E402
from chatloop.coordinator.structured_output import schema_to_gbnf  # noqa: E402
from chatloop.demo import demo_gguf  # noqa: E402
from chatloop.engine.grammar import GrammarSampler, add_grammar  # noqa: E402
from chatloop.engine.handles import Batch, Context, Model, Sampler  # noqa: E402
from chatloop.engine.tokenizer import Tokenizer  # noqa: E402

log = logging.getLogger("bench_grammar")

# Long output on purpose: a list the model keeps filling, so no sequence ends within the measured steps.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "qty": {"type": "integer"},
                    "kind": {"enum": ["fruit", "vegetable", "other"]},
                },
                "required": ["name", "qty", "kind"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}
QUESTION = "Write a long shopping list as JSON: a title and many items with name, quantity and kind."


def make_chain(model: Model, variant: str, gbnf: str) -> Sampler:
    if variant == "late":
        chain = GrammarSampler(model.vocab, model.n_vocab, gbnf)
    else:
        chain = Sampler()
        if variant == "first":
            add_grammar(chain, model.vocab, gbnf)
    chain.add(llama.llama_sampler_init_greedy())
    return chain


def run_once(
    model: Model, ctx: Context, batch: Batch, prompt: list[int], n_seq: int, steps: int, variant: str, gbnf: str, tok
):
    """(ms per step, ms of sampling per step, steps counted, texts) for one run."""
    ctx.clear()
    chains = [make_chain(model, variant, gbnf) for _ in range(n_seq)]
    n = len(prompt)
    last = []
    for s in range(n_seq):  # prefill each sequence (not timed)
        out = np.zeros(n, dtype=np.int8)
        out[-1] = 1
        batch.fill(np.arange(n), np.full(n, s), out, tokens=np.array(prompt))
        ctx.decode(batch)
        last.append(chains[s].sample(ctx, n - 1))
    texts = [[t] for t in last]
    step_ms, sample_ms = [], []
    for k in range(steps):
        if any(tok.is_eog(t) for t in last):
            break
        t0 = time.perf_counter()
        batch.fill(np.full(n_seq, n + k), np.arange(n_seq), np.ones(n_seq), tokens=np.array(last))
        ctx.decode(batch)
        t1 = time.perf_counter()
        last = [chains[s].sample(ctx, s) for s in range(n_seq)]
        t2 = time.perf_counter()
        step_ms.append((t2 - t0) * 1e3)
        sample_ms.append((t2 - t1) * 1e3)
        for s in range(n_seq):
            texts[s].append(last[s])
    for c in chains:
        c.close()
    return statistics.median(step_ms), statistics.median(sample_ms), len(step_ms), [tok.detokenize(t) for t in texts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a whole-model GGUF (default: the demo SmolLM2-135M Q4_1)")
    p.add_argument("--concurrency", default="1,8", help="sequences decoded together, comma-separated")
    p.add_argument("--steps", type=int, default=40, help="decode steps per run")
    p.add_argument("--reps", type=int, default=3, help="runs per variant (alternating)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = args.model or demo_gguf()
    levels = [int(x) for x in args.concurrency.split(",")]
    model = Model(path)
    params = llama.llama_context_default_params()
    params.n_ctx = 512 * max(levels)
    params.n_batch = 512
    params.n_ubatch = 512
    params.n_seq_max = max(levels)
    params.n_threads = params.n_threads_batch = args.threads
    params.kv_unified = True
    params.no_perf = True
    ctx = Context(model, params)
    batch = Batch(512)
    tok = Tokenizer(path)
    template = ChatTemplate.from_tokenizer(tok)
    prompt = tok.tokenize(template.render([{"role": "user", "content": QUESTION}]), add_special=False)
    gbnf = schema_to_gbnf(SCHEMA)
    results = []
    print(f"model {pathlib.Path(path).name}, {args.threads} threads, grammar {len(gbnf)} chars, vocab {model.n_vocab}")
    print(
        "| concurrency | ms/step free / first / late | sampling ms/step free / first / late | tok/s vs free: first, late |"
    )
    print("| --- | --- | --- | --- |")
    variants = ("free", "first", "late")
    for n_seq in levels:
        runs: dict[str, list] = {v: [] for v in variants}
        for _ in range(args.reps):
            for v in variants:
                runs[v].append(run_once(model, ctx, batch, prompt, n_seq, args.steps, v, gbnf, tok))
        step = {v: statistics.median(r[0] for r in runs[v]) for v in variants}
        smp = {v: statistics.median(r[1] for r in runs[v]) for v in variants}
        counted = min(r[2] for v in variants for r in runs[v])
        sample_text = runs["late"][0][3][0]
        same = runs["late"][0][3] == runs["first"][0][3]
        print(
            f"| {n_seq} | {step['free']:.2f} / {step['first']:.2f} / {step['late']:.2f} "
            f"| {smp['free']:.2f} / {smp['first']:.2f} / {smp['late']:.2f} "
            f"| {step['free'] / step['first']:.2f}x, {step['free'] / step['late']:.2f}x |"
            f"  ({counted} steps; first and late same text: {same})"
        )
        results.append(
            {
                "concurrency": n_seq,
                "ms_per_step": step,
                "sample_ms_per_step": smp,
                "tokens_per_s_vs_free": {v: step["free"] / step[v] for v in variants},
                "steps": counted,
                "same_text": same,
            }
        )
    print("grammar output of the first sequence (prefix):", json.dumps(sample_text[:160]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    tok.close()
    model.close()


if __name__ == "__main__":
    main()
