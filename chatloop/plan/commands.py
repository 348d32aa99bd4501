"""The ``chatloop plan`` and ``chatloop bench-host`` commands (imported only when one of them runs)."""

from __future__ import annotations

import logging
import pathlib
import socket
import sys

from chatloop.config import ConfigError
from chatloop.plan.hosts import load_hosts
from chatloop.plan.model_shape import ShapeError, load_shape
from chatloop.plan.planner import PlanError, load_plan, make_plan
from chatloop.plan.render import TOKEN_FILE, convert_command, table, write_outputs

log = logging.getLogger(__name__)


def run_plan(args) -> int:
    try:
        hosts = load_hosts(args.hosts)
        shape = load_shape(args.model, args.quant)
        plan = make_plan(shape, hosts, shape_at=lambda q: load_shape(args.model, q))
    except (ConfigError, ShapeError, PlanError, ValueError) as exc:
        print(f"chatloop plan: error: {exc}", file=sys.stderr)
        return 2
    print(table(plan, hosts))
    if args.out:
        try:
            written = write_outputs(plan, hosts, args.out)
        except OSError as exc:
            print(f"chatloop plan: error: cannot write {args.out} ({exc})", file=sys.stderr)
            return 2
        print(f"\nwrote {', '.join(p.name for p in written)} into {args.out}")
        print(f"cluster token: {args.out / TOKEN_FILE} (new; every stage and the coordinator need it, keep it private)")
        print(f"convert: {convert_command(plan, args.out / 'model')}")
        print(f"     or: chatloop convert --plan {args.out / 'plan.json'} --out {args.out / 'model'}")
    return 0


def convert_args_from_plan(path: pathlib.Path) -> tuple[str, str, str]:
    """``(source, layers, quant)`` for ``chatloop convert --plan``; ``PlanError`` when the plan is unusable."""
    plan = load_plan(path)
    return plan.source, plan.layers_arg, plan.quant


def run_bench_host(args) -> int:
    from chatloop.plan.bench_host import (  # noqa: PLC0415 - llama.cpp only when measuring
        available_memory_gb,
        bench,
        default_address,
        default_threads,
        host_entry,
    )

    if args.steps < 1 or args.threads < 0:
        print("chatloop bench-host: error: --steps must be 1 or more and --threads 0 or more", file=sys.stderr)
        return 2
    threads = args.threads or default_threads()
    model = None
    if args.model:
        model = pathlib.Path(args.model)
        if model.is_dir():
            print(
                "chatloop bench-host: error: --model takes a GGUF file (a converted folder's stage files hold "
                "few layers each)",
                file=sys.stderr,
            )
            return 2
        if not model.is_file():
            print(f"chatloop bench-host: error: {model}: no such file", file=sys.stderr)
            return 2
    try:
        result = bench(model, threads, steps=args.steps)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"chatloop bench-host: error: {exc}", file=sys.stderr)
        return 2
    name = args.name or socket.gethostname().split(".")[0]
    memory = args.memory_gb if args.memory_gb is not None else available_memory_gb() * 0.9
    print(host_entry(result, name, args.address or default_address(), memory))
    return 0
