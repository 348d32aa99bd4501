#!/usr/bin/env python3
"""Time to first token of a multi-turn chat, with and without the prefix cache, against llama-server.

A conversation: a system prompt of ~1,000 tokens and 6 turns, each adding ~60 tokens of user text and up to 48
generated tokens (greedy), sent as OpenAI chat requests (streamed), the whole conversation every turn as chat clients
do. In the same run, alternating servers:

- ChatLoop (demo model, 2 stages, ``--threads`` per stage) with the prefix cache on (``prefix_cache_exact: true``,
  the default: only whole blocks of earlier prompts, bit-exact), on and not exact (every cached position, the
  previous replies included, as llama-server reuses them), and off;
- llama-server on the whole GGUF with the same threads, its prompt cache on (``cache_prompt``, one slot), when a
  binary is found (``$LLAMA_SERVER`` or built once by ``benchlib.llama_server.build_llama_server``).

Printed: TTFT of turn 1 and of turns 2-6 per server, the ratios the issue asks for, and the aggregate tokens/s of
``--concurrency`` conversations sharing the system prompt (cache on vs off).

    python scripts/bench_prefix.py --threads 2 --reps 1
    python scripts/bench_prefix.py --chatloop cache,not-exact --concurrency 1     # without the slow no-cache leg
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time

import benchlib  # noqa: F401 - puts the repository on sys.path
from benchlib.children import Children, exit_on_sigterm, workdir
from benchlib.client import greedy_chat_body
from benchlib.cluster import ChatLoopCluster, ChatLoopVariant
from benchlib.llama_server import LlamaServer, find_llama_server

from chatloop.demo import demo_gguf, demo_model_dir

log = logging.getLogger("bench_prefix")

TOPICS = ["tides", "lamps", "fog horns", "storms", "ships", "keepers", "lenses", "islands", "charts", "gulls"]


def system_prompt(n_paragraphs: int) -> str:
    parts = ["You are the archivist of a lighthouse museum. Follow these notes when you answer."]
    for i in range(n_paragraphs):
        t = TOPICS[i % len(TOPICS)]
        parts.append(
            f"Note {i + 1}: visitors often ask about {t}. Explain {t} plainly, mention the keeper's log of {1800 + i},"
            f" never guess a date, and keep every answer under five sentences. Record {t} in the daily ledger."
        )
    return "\n".join(parts)


def user_turn(conv: int, turn: int) -> str:
    t = TOPICS[(conv + turn) % len(TOPICS)]
    return (
        f"Visitor {conv}, question {turn}: I read that the keepers on the northern island wrote about {t} every "
        f"evening after lighting the lamp. What would such an entry about {t} have said, and why did it matter?"
    )


async def chat_turn(session, url: str, messages: list[dict], max_tokens: int) -> tuple[float, str, int, int]:
    """(seconds to the first content chunk, reply text, completion tokens, cached prompt tokens)."""
    body = greedy_chat_body(messages, max_tokens, cache_prompt=True)  # cache_prompt: llama-server's prompt cache
    t0 = time.perf_counter()
    ttft, text, tokens, cached = None, "", 0, 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            obj = json.loads(line[5:])
            for c in obj.get("choices") or []:
                piece = (c.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text += piece
            usage = obj.get("usage")
            if usage:
                tokens = usage.get("completion_tokens") or 0
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return (ttft if ttft is not None else time.perf_counter() - t0), text, tokens, cached


async def conversation(url: str, system: str, conv: int, turns: int, max_tokens: int) -> list[dict]:
    import aiohttp  # noqa: PLC0415

    messages = [{"role": "system", "content": system}]
    out = []
    # NOTE: a connection per request: the llama-server built from llama-cpp-python 0.3.36's llama.cpp exits (as if
    # stopped) when a keep-alive connection that carried a streamed chat response is used again.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600), connector=connector) as session:
        for turn in range(turns):
            messages.append({"role": "user", "content": user_turn(conv, turn)})
            ttft, text, tokens, cached = await chat_turn(session, url, messages, max_tokens)
            messages.append({"role": "assistant", "content": text})
            out.append({"turn": turn + 1, "ttft_s": ttft, "tokens": tokens, "cached": cached})
    return out


async def many(url: str, system: str, n: int, turns: int, max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(conversation(url, system, c, turns, max_tokens) for c in range(n)))
    return time.perf_counter() - t0, sum(t["tokens"] for r in results for t in r)


def run_server(name: str, start, stop, system: str, args) -> dict | None:
    """One server's figures, logged as soon as they are in; None (with the reason logged) when it failed."""
    log.info("%s: starting", name)
    try:
        url = start()
        single = asyncio.run(conversation(url, system, 0, args.turns, args.max_tokens))
        row = {"server": name, "turns": single}
        log.info("%s: TTFT per turn %s s", name, ", ".join(f"{t['ttft_s']:.2f}" for t in single))
        if args.concurrency > 1:
            wall, tokens = asyncio.run(many(url, system + " ", args.concurrency, args.turns, args.max_tokens))
            row["concurrent_tok_s"] = tokens / wall
            log.info("%s: %d conversations %.1f tok/s", name, args.concurrency, row["concurrent_tok_s"])
        return row
    except Exception as exc:  # noqa: BLE001 - a failed server is reported, the others still count
        log.error("%s failed: %s: %s", name, type(exc).__name__, exc)
        return None
    finally:
        stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads per stage and for llama-server")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--paragraphs", type=int, default=24, help="system prompt size (24 = about 1,000 tokens)")
    ap.add_argument("--concurrency", type=int, default=8, help="conversations at once for the throughput figure")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-llama-server", action="store_true")
    ap.add_argument(
        "--chatloop",
        type=lambda v: [x for x in v.split(",") if x],
        default=["cache", "not-exact", "no-cache"],
        help="ChatLoop legs: cache (prefix_cache_exact: true, the default), not-exact (false), no-cache "
        "(default: all three)",
    )
    args = ap.parse_args()
    unknown = [n for n in args.chatloop if n not in ("cache", "not-exact", "no-cache")]
    if unknown:
        ap.error(f"--chatloop: unknown legs {unknown} (known: cache, not-exact, no-cache)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    exit_on_sigterm()
    model_dir, gguf = demo_model_dir(2), demo_gguf()
    binary = None if args.no_llama_server else find_llama_server()
    rows = []
    with workdir() as tmp:
        import pathlib  # noqa: PLC0415

        children = Children(pathlib.Path(tmp))
        try:
            for rep in range(args.reps):
                system = f"Session {rep}. " + system_prompt(args.paragraphs)
                for name in args.chatloop:
                    cluster = ChatLoopCluster(
                        children,
                        model_dir,
                        ChatLoopVariant(
                            threads=args.threads,
                            prefix_cache=name != "no-cache",
                            prefix_exact=name != "not-exact",
                            kv_cache_mb=1024,
                        ),
                        pathlib.Path(tmp),
                    )
                    row = run_server(f"chatloop {name}", lambda c=cluster: c.start().url, cluster.stop, system, args)
                    if row is not None:
                        rows.append(row)
                if binary:
                    server = LlamaServer(children, binary, gguf, args.threads, slots=1, ctx_per_slot=4096)
                    row = run_server("llama-server", lambda s=server: s.start().url, server.stop, system, args)
                    if row is None:
                        log.error("llama-server's log ends:\n%s", server.log_tail())
                    else:
                        rows.append(row)
        finally:
            children.stop()
    by = {}
    for r in rows:
        by.setdefault(r["server"], []).append(r)
    print(f"\nmulti-turn chat, {args.turns} turns, threads {args.threads} (per stage / llama-server), reps {args.reps}")
    summary = {}
    for name, rs in by.items():
        t1 = statistics.median(r["turns"][0]["ttft_s"] for r in rs)
        later = statistics.median(t["ttft_s"] for r in rs for t in r["turns"][1:])
        cached = statistics.median(t["cached"] for r in rs for t in r["turns"][1:])
        conc = [r["concurrent_tok_s"] for r in rs if "concurrent_tok_s" in r]
        summary[name] = {"ttft_turn1_s": t1, "ttft_later_s": later, "cached_later": cached}
        line = (
            f"  {name:18s} TTFT turn 1 {t1:7.2f} s | turns 2-{args.turns} median {later:6.2f} s (cached {cached:.0f})"
        )
        if conc:
            summary[name]["concurrent_tok_s"] = statistics.median(conc)
            line += f" | {args.concurrency} conversations {statistics.median(conc):6.1f} tok/s"
        print(line)
    on, off, ls = summary.get("chatloop cache"), summary.get("chatloop no-cache"), summary.get("llama-server")
    loose = summary.get("chatloop not-exact")
    if on and off:
        print(f"  turns 2+ TTFT, no cache / cache: {off['ttft_later_s'] / on['ttft_later_s']:.2f} x (target >= 5)")
        if "concurrent_tok_s" in on:
            print(f"  {args.concurrency} conversations tok/s, cache / no cache: "
                  f"{on['concurrent_tok_s'] / off['concurrent_tok_s']:.2f} x")  # fmt: skip
    if on and ls:
        print(f"  turn 1 TTFT vs llama-server: {on['ttft_turn1_s'] / ls['ttft_turn1_s']:.2f} x (target <= 1.1)")
        print(f"  turns 2+ TTFT vs llama-server: {on['ttft_later_s'] / ls['ttft_later_s']:.2f} x (target <= 1.5)")
    if loose and ls:
        print(f"  not exact, turns 2+ TTFT vs llama-server: {loose['ttft_later_s'] / ls['ttft_later_s']:.2f} x")
    if loose and off:
        print(f"  not exact, turns 2+ TTFT, no cache / cache: {off['ttft_later_s'] / loose['ttft_later_s']:.2f} x")
    print(json.dumps({"args": vars(args), "summary": summary, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
