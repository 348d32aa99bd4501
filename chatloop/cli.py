"""The ``chatloop`` command: convert, generate, stage, coordinator, serve, chat, config check."""

from __future__ import annotations

import argparse
import codecs
import pathlib
import sys
import time

from chatloop.modelfiles.quant import QUANT_NAMES

CONVERT_HELP = """\
SOURCE is a .gguf file, a local Hugging Face folder (config.json, tokenizer files, *.safetensors) or a
Hugging Face model id (org/name). Temporary disk space: a GGUF source needs only the stage files
(about the size of the source); an HF source also needs one full-precision GGUF of the model
(2 bytes per parameter at f16/bf16, 4 at f32) under OUT/.partial/ until the stages are written."""


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="slice a model into per-stage GGUF files",
        description=CONVERT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", nargs="?", help="a .gguf file, a local HF folder, or an HF model id (default: the plan's)")
    p.add_argument("--out", required=True, type=pathlib.Path, help="output directory")
    p.add_argument("--plan", type=pathlib.Path, help="plan.json from chatloop plan: its layer ranges and quantization")
    p.add_argument("--stages", type=int, default=2, help="number of stages (default 2)")
    p.add_argument("--layers", help="explicit half-open layer ranges, e.g. 0:10,10:20,20:30")
    p.add_argument("--quant", choices=list(QUANT_NAMES), help="default: keep for a GGUF source, q8_0 for HF")
    p.add_argument("--revision", help="HF branch, tag or commit")
    p.add_argument("--threads", type=int, default=0, help="quantizer threads (default: all cores)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="run every stage of a converted model in this process")
    p.add_argument("model_dir", type=pathlib.Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads per stage (default: all cores)")


def _cmd_convert(args) -> int:
    from converters.convert import ConvertError, ConvertRequest, convert  # noqa: PLC0415

    if args.plan:
        from chatloop.plan.commands import convert_args_from_plan  # noqa: PLC0415
        from chatloop.plan.planner import PlanError  # noqa: PLC0415

        if args.layers or args.quant:
            print("chatloop convert: error: --plan sets --layers and --quant; give one or the other", file=sys.stderr)
            return 2
        try:
            source, args.layers, args.quant = convert_args_from_plan(args.plan)
        except PlanError as exc:
            print(f"chatloop convert: error: {exc}", file=sys.stderr)
            return 2
        args.source = args.source or source
    if not args.source:
        print("chatloop convert: error: SOURCE is required (the plan names none)", file=sys.stderr)
        return 2
    try:
        m = convert(
            ConvertRequest(
                source=args.source,
                out=args.out,
                stages=args.stages,
                layers=args.layers,
                quant=args.quant,
                revision=args.revision,
                threads=args.threads,
            )
        )
    except (ConvertError, ValueError, OSError, RuntimeError) as exc:
        print(f"chatloop convert: error: {exc}", file=sys.stderr)
        return 2
    for s in m.stages:
        print(f"{args.out / s.file}: layers {s.layer_start}:{s.layer_end}, {s.size_bytes / 1e6:.1f} MB")
    for note in m.notes:
        print(f"note: {note}")
    return 0


def _cmd_generate(args) -> int:
    import os  # noqa: PLC0415

    from chatloop.engine.local_chain import LocalChain  # noqa: PLC0415
    from chatloop.engine.runtime import RuntimeOptions  # noqa: PLC0415
    from chatloop.protocol.sampling import SamplingParams  # noqa: PLC0415

    threads = args.threads or os.cpu_count() or 1
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    with LocalChain(args.model_dir, RuntimeOptions(n_threads=threads, max_sequences=1, kv_cache_mb=64)) as chain:
        text = args.prompt
        if args.chat:
            from chatloop.coordinator.chat_template import ChatTemplate  # noqa: PLC0415

            text = ChatTemplate.from_tokenizer(chain.tokenizer).render([{"role": "user", "content": args.prompt}])
        prompt = chain.tokenizer.tokenize(text)
        start = time.perf_counter()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        n = 0
        for tok in chain.generate_tokens(prompt, args.max_tokens, sampling):
            n += 1
            if chain.tokenizer.is_eog(tok.token):
                break
            sys.stdout.write(decoder.decode(chain.tokenizer.piece(tok.token)))
            sys.stdout.flush()
        print(decoder.decode(b"", final=True))
        dt = time.perf_counter() - start
        print(f"[{len(prompt)} prompt tokens, {n} generated in {dt:.2f} s: {n / dt:.1f} tokens/s]", file=sys.stderr)
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="choose layer ranges and replicas for a set of machines; write their configs")
    p.add_argument("model", help="a .gguf file, a converted folder, an HF folder or config.json, or an HF model id")
    p.add_argument(
        "--hosts", required=True, type=pathlib.Path, help="hosts.yaml: the machines (see configs/plan/hosts.yaml)"
    )
    p.add_argument("--quant", help="quantization to plan for: keep, f32, f16, bf16, q8_0, q4_0, q4_k_m")
    p.add_argument("--out", type=pathlib.Path, help="write plan.json, stage/coordinator configs and compose here")


def _cmd_plan(args) -> int:
    from chatloop.plan.commands import run_plan  # noqa: PLC0415

    return run_plan(args)


def _add_bench_host(sub) -> None:
    p = sub.add_parser("bench-host", help="measure this machine's decode speed; print a hosts.yaml entry")
    p.add_argument("--model", help="a .gguf file whose layers to time (default: a synthetic 1B-class layer)")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: the cores this process may use)")
    p.add_argument("--steps", type=int, default=40, help="decodes timed per measurement (default 40)")
    p.add_argument("--name", help="host name in the entry (default: this machine's)")
    p.add_argument("--address", help="address in the entry (default: this machine's)")
    p.add_argument("--memory-gb", type=float, help="memory ChatLoop may use (default: 90 %% of what is available)")


def _cmd_bench_host(args) -> int:
    from chatloop.plan.commands import run_bench_host  # noqa: PLC0415

    return run_bench_host(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatloop", description="Distributed CPU-only LLM inference with llama.cpp")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_generate(sub)
    from chatloop.chat_cli import add_parser as add_chat  # noqa: PLC0415

    _add_plan(sub)
    _add_bench_host(sub)
    from chatloop.config import add_parser as add_config  # noqa: PLC0415
    from chatloop.coordinator.main import add_parser as add_coordinator  # noqa: PLC0415
    from chatloop.serve import add_parser as add_serve  # noqa: PLC0415
    from chatloop.stage.main import add_parser as add_stage  # noqa: PLC0415

    handlers = {"convert": _cmd_convert, "generate": _cmd_generate, "plan": _cmd_plan, "bench-host": _cmd_bench_host}
    for add in (add_stage, add_coordinator, add_serve, add_config, add_chat):
        name, handler = add(sub)
        handlers[name] = handler
    args = parser.parse_args(argv)
    from chatloop.logs import setup_logging  # noqa: PLC0415

    # Servers log JSON lines; the one-shot tools log plain text for a person at a terminal.
    setup_logging(args.log_level, None if args.command in ("stage", "coordinator", "serve") else "text")
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
