"""``chatloop stage``: load one stage file and serve it."""

from __future__ import annotations

import logging
import pathlib
import sys

from chatloop import event_loop, step_trace
from chatloop.bind_policy import insecure_bind_error
from chatloop.config import ConfigError, StageConfig, load_config
from chatloop.logs import setup_logging

log = logging.getLogger(__name__)


def add_parser(sub):
    p = sub.add_parser("stage", help="serve one stage of a converted model")
    p.add_argument("--config", type=pathlib.Path, help="stage YAML (see configs/stage.yaml)")
    p.add_argument("--weights", dest="weights_path", help="stage GGUF file (overrides weights_path)")
    p.add_argument("--layer-group", type=int, help="stage index in the manifest")
    p.add_argument("--worker-id")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--threads", type=int, help="llama.cpp threads")
    p.add_argument("--kv-cache-mb", type=int)
    p.add_argument("--max-sequences", type=int)
    p.add_argument("--cpu-cores", help="pin to these cores, e.g. 0-3")
    p.add_argument("--cluster-token", help="shared token every stage endpoint requires")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the stage file")
    return "stage", run


def config_from_args(args) -> StageConfig:
    overrides: dict = {
        "weights_path": args.weights_path,
        "layer_group": args.layer_group,
        "worker_id": args.worker_id,
        "host": args.host,
        "port": args.port,
        "max_sequences": args.max_sequences,
    }
    if args.no_verify:
        overrides["verify_sha256"] = False
    perf: dict = {}
    for key, value in (("n_threads", args.threads), ("kv_cache_mb", args.kv_cache_mb), ("cpu_cores", args.cpu_cores)):
        if value is not None:
            perf[key] = value
    if args.cpu_cores:
        perf["enable_cpu_pinning"] = True
    if perf:
        overrides["performance"] = perf
    if args.cluster_token:
        overrides["security"] = {"cluster_token": args.cluster_token}
    return load_config(StageConfig, args.config, overrides=overrides)


def run(args) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"chatloop stage: error: {exc}", file=sys.stderr)
        return 2
    name = cfg.worker_id or (f"stage-{cfg.layer_group}" if cfg.layer_group is not None else "stage")
    setup_logging(cfg.observability.log_level, cfg.observability.log_format, name)
    refusal = insecure_bind_error("stage", cfg.host, cfg.security.cluster_token, cfg.allow_insecure)
    try:
        event_loop.chosen_loop()
    except event_loop.EventLoopError as exc:
        refusal = refusal or str(exc)
    if refusal:
        print(f"chatloop stage: error: {refusal}", file=sys.stderr)
        return 2
    # NOTE: llama.cpp loads only when a stage really starts, not for `chatloop --help` or `config check`.
    from chatloop.stage.startup import StageStartError, build_state, serve_stage  # noqa: PLC0415

    try:
        state = build_state(cfg)
    except (StageStartError, OSError, RuntimeError, ValueError) as exc:
        log.error("cannot start stage: %s", exc)
        print(f"chatloop stage: error: {exc}", file=sys.stderr)
        return 2
    try:
        event_loop.run(serve_stage(state))
    finally:
        step_trace.flush()  # NOTE: before the model is freed: a crash there must not lose the marks
        state.runtime.close()
    return 0
