#!/usr/bin/env python3
"""Speculative decoding (prompt lookup) on and off, in the same run: tokens/s of the demo model in 3 stages.

Two coordinators share the same three stage processes: one reaches them directly, the other through
``scripts/delay_proxy.py`` (``--delay-ms`` one way on every coordinator-stage link, as across machines). Every
request is greedy and streamed, and goes out twice in a row, once with ``"speculative": {"method": "off"}`` and
once with ``"ngram"`` (the order alternates between rounds), so both see the same machine load:

- **copy**: rewrite a given paragraph (correct its spelling), and repeat a given document: output repeats input;
- **free**: a story: little to copy, speculation must not cost much;
- **concurrency 8**: eight such requests at once (copy and free mixed), aggregate tokens/s.

Printed per link delay and task: tokens/s off and on (request sent to last token, so the prompt's processing
counts) and their ratio (on / off); for single streams also the ratio of decode speeds (tokens after the first
over the time after the first, what speculation changes: llama.cpp's speculative example reports the same); the
acceptance rate and mean accepted length of the proposals (``/v1/cluster``), and whether the texts were equal
(they must be). ``--quant q4_0`` runs the demo requantized: on x86 llama.cpp computes Q4_0 and Q8_0 rows in tiled
and repacked kernels, Q4_1 one row at a time, so a verified row costs less.

    .venv/bin/python scripts/bench_spec.py [--delay-ms 5] [--reps 3] [--max-tokens 128] [--quant q4_0]
    .venv/bin/python scripts/bench_spec.py --delay-ms 0 --tasks concurrency8 --reps 8   # one run, more rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import sys
import time
import urllib.request

import aiohttp
import benchlib  # noqa: F401 - puts the repository on sys.path
import yaml
from benchlib.children import Children, exit_on_sigterm, wait_http, workdir
from benchlib.client import greedy_chat_body
from benchlib.cluster import ChatLoopCluster, ChatLoopVariant

from chatloop.demo import demo_model_dir
from chatloop.http_util import free_port

log = logging.getLogger("bench_spec")

PARAGRAPH = (
    "The lighthouse keeper climbed the narow stairs every evening at sunset. He cleaned the great lens, "
    "trimmed the wick and wound the clockwork that turned the light. Ships far out at sea saw the beam "
    "sweep acros the water and knew were the rocks lay. In winter the storms were so strong that the "
    "whole tower shook, but the light never went out, and the keeper wrote every ship he saw in his log."
)
TASKS = {
    "copy": [
        f"Rewrite the following paragraph with its spelling mistakes corrected. Keep everything else the same.\n\n"
        f"{PARAGRAPH}",
        f"Here is a document:\n\n{PARAGRAPH}\n\nRepeat the document above word for word.",
    ],
    "free": [
        "Write a short story about a dragon who learns to bake bread.",
        "Tell me a story about a girl who finds a secret door in her school.",
    ],
}


async def stream_chat(session, url: str, prompt: str, max_tokens: int, method: str) -> dict:
    body = greedy_chat_body([{"role": "user", "content": prompt}], max_tokens, speculative={"method": method})
    sent = time.perf_counter()
    text, tokens, first, last = [], 0, None, sent
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            obj = json.loads(line[5:])
            if "error" in obj:
                raise RuntimeError(str(obj["error"]))
            for choice in obj.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    text.append(piece)
                    last = time.perf_counter()
                    first = first or last
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    # decode_secs: from the first streamed piece to the last (no prompt processing; speculation only changes this)
    return {"text": "".join(text), "tokens": tokens, "secs": last - sent, "decode_secs": last - (first or last)}


def spec_view(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/v1/cluster", timeout=30) as resp:
        return json.load(resp)["speculative"]


async def measure(url: str, prompts: list[str], max_tokens: int, reps: int, concurrency: int) -> dict:
    """tokens/s with speculation off and on, alternating; ``concurrency`` copies of the prompt list at once."""
    totals = {"off": [0, 0.0], "ngram": [0, 0.0]}
    decode = {"off": [0, 0.0], "ngram": [0, 0.0]}  # single streams: tokens after the first / their seconds
    texts: dict[str, list[str]] = {"off": [], "ngram": []}
    before = spec_view(url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        for r in range(reps):
            for method in ("off", "ngram") if r % 2 == 0 else ("ngram", "off"):
                batch = (prompts * concurrency)[: max(concurrency, len(prompts))] if concurrency > 1 else prompts
                if concurrency > 1:
                    t0 = time.perf_counter()
                    outs = await asyncio.gather(*(stream_chat(session, url, p, max_tokens, method) for p in batch))
                    totals[method][0] += sum(o["tokens"] for o in outs)
                    totals[method][1] += time.perf_counter() - t0
                else:
                    outs = []
                    for p in batch:
                        o = await stream_chat(session, url, p, max_tokens, method)
                        outs.append(o)
                        totals[method][0] += o["tokens"]
                        totals[method][1] += o["secs"]
                        decode[method][0] += max(o["tokens"] - 1, 0)
                        decode[method][1] += o["decode_secs"]
                if r < 2:
                    texts[method] += [o["text"] for o in outs]
    after = spec_view(url)
    proposed = after["proposed_tokens"] - before["proposed_tokens"]
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    steps = after["verify_steps"] - before["verify_steps"]
    off = totals["off"][0] / totals["off"][1]
    on = totals["ngram"][0] / totals["ngram"][1]
    decode_ratio = float("nan")
    if decode["off"][1] and decode["ngram"][1]:
        decode_ratio = (decode["ngram"][0] / decode["ngram"][1]) / (decode["off"][0] / decode["off"][1])
    return {
        "off": off,
        "on": on,
        "ratio": on / off,
        "decode_ratio": decode_ratio,
        "acceptance": accepted / proposed if proposed else float("nan"),
        "mean_accepted": accepted / steps if steps else float("nan"),
        "same_text": sorted(texts["off"]) == sorted(texts["ngram"]),
        "row_ms": after["step_ms_per_row"],
    }


def start_delayed_coordinator(children: Children, cluster: ChatLoopCluster, delay_ms: float, tmp: pathlib.Path):
    """A second coordinator of the same stages, each link through a delay proxy."""
    proxy_urls = []
    for i, url in enumerate(cluster.stage_urls):
        port = free_port()
        target = url.removeprefix("http://")
        cmd = [sys.executable, "scripts/delay_proxy.py", "--listen", str(port), "--target", target]
        children.start(f"proxy-{i}", cmd + ["--delay-ms", str(delay_ms)])
        proxy_urls.append(f"http://127.0.0.1:{port}")
    port = free_port()
    cfg = {
        "stages": [[u] for u in proxy_urls],
        "model_dir": str(cluster.model_dir),
        "host": "127.0.0.1",
        "port": port,
        "batching": {"pipeline_depth": cluster.variant.pipeline_depth, "max_batch_size": 16},
        "prefix_cache": False,
        "observability": {"log_level": "WARNING"},
    }
    path = tmp / f"coordinator-delayed-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = children.start(
        "coordinator-delayed", [sys.executable, "-m", "chatloop.cli", "coordinator", "--config", str(path)]
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", proc, timeout=300)
    return url


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay-ms", type=float, default=5.0, help="one-way delay on every link of the delayed run")
    p.add_argument("--reps", type=int, default=3, help="rounds of off/on per task")
    p.add_argument("--max-tokens", type=int, default=128, help="generated tokens per request")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads per stage")
    p.add_argument("--quant", default="keep", choices=("keep", "q4_0", "q8_0"),
                   help="the demo's quantization (keep: the shipped Q4_1; x86 llama.cpp computes several rows of "
                        "Q4_0 and Q8_0 at once in tiled kernels, Q4_1 row by row)")  # fmt: skip
    p.add_argument("--tasks", default="copy,free,concurrency8",
                   help="which runs, comma-separated: copy, free, concurrency8 (default all three)")  # fmt: skip
    args = p.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - {"copy", "free", "concurrency8"}:
        p.error(f"--tasks: copy, free and/or concurrency8, got {args.tasks!r}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    exit_on_sigterm()
    with workdir() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        children = Children(tmp)
        try:
            # NOTE: no prefix cache: its entries would hold the stages' slots that the other coordinator needs.
            variant = ChatLoopVariant(threads=args.threads, pipeline_depth=1, prefix_cache=False)
            cluster = ChatLoopCluster(children, demo_model_dir(3, args.quant), variant, tmp).start()
            links = {"0 ms": cluster.url}
            if args.delay_ms:
                links[f"{args.delay_ms:g} ms"] = start_delayed_coordinator(children, cluster, args.delay_ms, tmp)
            print(
                f"demo model ({args.quant}), 3 stages, {args.threads} thread(s) each, greedy, {args.max_tokens} tokens, "
                f"{args.reps} reps; tok/s from request to last token; decode on/off: after the first token"
            )
            print(
                f"{'link':>6} {'task':>14} {'off tok/s':>10} {'on tok/s':>9} {'on/off':>7} {'decode':>7} {'accept':>7} "
                f"{'mean len':>9} {'row ms':>7} same"
            )
            for link, url in links.items():
                runs = {
                    "copy": ("copy", TASKS["copy"], 1, args.max_tokens),
                    "free": ("free", TASKS["free"], 1, args.max_tokens),
                    "concurrency8": ("concurrency 8", TASKS["copy"] + TASKS["free"], 8, args.max_tokens // 2),
                }
                for name, prompts, conc, max_tokens in (runs[t] for t in tasks):
                    r = asyncio.run(measure(url, prompts, max_tokens, args.reps, conc))
                    print(
                        f"{link:>6} {name:>14} {r['off']:10.2f} {r['on']:9.2f} {r['ratio']:6.2f}x {r['decode_ratio']:6.2f}x "
                        f"{r['acceptance']:7.2f} {r['mean_accepted']:9.2f} {r['row_ms']:7.1f} {'yes' if r['same_text'] else 'NO'}",
                        flush=True,
                    )
        finally:
            children.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
