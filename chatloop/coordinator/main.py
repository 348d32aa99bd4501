"""``chatloop coordinator``: serve the API in front of running stages."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import sys
import time

from chatloop import event_loop
from chatloop.bind_policy import insecure_bind_error
from chatloop.config import ConfigError, CoordinatorConfig, load_config
from chatloop.http_util import run_app
from chatloop.logs import setup_logging

log = logging.getLogger(__name__)


def add_parser(sub):
    p = sub.add_parser("coordinator", help="serve the HTTP API in front of running stages")
    p.add_argument("--config", type=pathlib.Path, help="coordinator YAML (see configs/coordinator.yaml)")
    p.add_argument(
        "--stage",
        action="append",
        dest="stage_urls",
        metavar="URL[,URL...]",
        help="a stage's replica URLs, once per stage in chain order",
    )
    p.add_argument("--model-dir", help="converted model folder (for the tokenizer)")
    p.add_argument("--model-name", help="model name served in /v1/models")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", action="append", dest="api_keys", help="accepted API key (repeatable)")
    p.add_argument("--cluster-token", help="token sent to every stage")
    return "coordinator", run


def config_from_args(args) -> CoordinatorConfig:
    overrides: dict = {"model_dir": args.model_dir, "model_name": args.model_name, "host": args.host, "port": args.port}
    if args.stage_urls:
        overrides["stages"] = [[u.strip() for u in s.split(",") if u.strip()] for s in args.stage_urls]
    if args.api_keys or args.cluster_token:
        overrides["security"] = {"api_keys": args.api_keys, "cluster_token": args.cluster_token}
    return load_config(CoordinatorConfig, args.config, overrides=overrides)


async def serve_coordinator(cfg: CoordinatorConfig) -> None:
    from chatloop.coordinator.app import STATE, create_app  # noqa: PLC0415 - the CLI loads the server only when run

    app = create_app(cfg)

    async def drain() -> None:
        st = app[STATE]
        st.draining = True
        deadline = time.monotonic() + cfg.drain_grace_secs
        while time.monotonic() < deadline and st.scheduler and st.scheduler.busy:
            await asyncio.sleep(0.1)

    await run_app(app, cfg.host, cfg.port, drain, ready_line=f"coordinator listening on http://{cfg.host}:{cfg.port}")


def draft_model_error(cfg: CoordinatorConfig) -> str | None:
    """Why the configured draft model cannot serve (another vocabulary, no such file), when ``model_dir`` gives
    the served vocabulary here; without it the check runs once the vocabulary is fetched (coordinator/startup.py)."""
    if not cfg.speculative.draft_model or not cfg.model_dir:
        return None
    from chatloop.coordinator.draft_model import DraftModelError, check_vocabulary  # noqa: PLC0415 - loads llama.cpp
    from chatloop.engine.tokenizer import Tokenizer  # noqa: PLC0415
    from chatloop.modelfiles.manifest import ManifestError, load_manifest  # noqa: PLC0415

    draft = pathlib.Path(cfg.speculative.draft_model)
    if not draft.is_file():
        return f"speculative.draft_model {draft}: no such file"
    try:
        served = Tokenizer(pathlib.Path(cfg.model_dir) / load_manifest(cfg.model_dir).stages[0].file)
    except (ManifestError, OSError, RuntimeError):
        return None  # the served model's own problems are reported where they are loaded
    try:
        vocab = Tokenizer(draft)
    except RuntimeError as exc:
        served.close()
        return f"speculative.draft_model {draft}: cannot load it ({exc})"
    try:
        check_vocabulary(vocab, served, draft)
    except DraftModelError as exc:
        return str(exc)
    finally:
        vocab.close()
        served.close()
    return None


def run(args) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"chatloop coordinator: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.observability.log_level, cfg.observability.log_format, "coordinator")
    refusal = insecure_bind_error("coordinator", cfg.host, cfg.security.cluster_token, cfg.allow_insecure)
    refusal = refusal or draft_model_error(cfg)
    if refusal:
        print(f"chatloop coordinator: error: {refusal}", file=sys.stderr)
        return 2
    try:
        event_loop.run(serve_coordinator(cfg))
    except (OSError, event_loop.EventLoopError) as exc:
        print(f"chatloop coordinator: error: {exc}", file=sys.stderr)
        return 2
    return 0
