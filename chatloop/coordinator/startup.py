"""Start-up: the served model's name and the vocabulary (from ``model_dir`` or fetched from stage 0), retried
until it loads; then the scheduler starts."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import tempfile

from aiohttp import web

from chatloop.config import CoordinatorConfig
from chatloop.coordinator.chat_template import ChatTemplate, ChatTemplateError
from chatloop.coordinator.draft_model import DraftModel, DraftModelError
from chatloop.coordinator.scheduler import Scheduler
from chatloop.coordinator.state import STATE
from chatloop.coordinator.tool_prompt import probe
from chatloop.engine.tokenizer import Tokenizer
from chatloop.modelfiles.manifest import ManifestError, load_manifest

log = logging.getLogger(__name__)


def model_name(cfg: CoordinatorConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    if cfg.model_dir:
        try:
            return load_manifest(cfg.model_dir).model
        except ManifestError:
            pass
    return "chatloop"


async def boot(app: web.Application) -> None:
    """Load the vocabulary (from model_dir, else from stage 0) and start scheduling; retry until it works."""
    st = app[STATE]
    delay = 0.5
    while st.tokenizer is None:
        try:
            if st.cfg.model_dir:
                m = load_manifest(st.cfg.model_dir)
                path = pathlib.Path(st.cfg.model_dir) / m.stages[0].file
            else:
                data = await st.cluster.fetch_vocab()
                st.tmpdir = tempfile.TemporaryDirectory(prefix="chatloop-vocab-")
                path = pathlib.Path(st.tmpdir.name) / "vocab.gguf"
                path.write_bytes(data)
            tokenizer = await asyncio.get_running_loop().run_in_executor(None, Tokenizer, path)
            st.template = ChatTemplate.from_tokenizer(tokenizer)
            st.tool_caps = probe(st.template)
            st.tokenizer = tokenizer
        except (OSError, RuntimeError, ManifestError, ChatTemplateError) as exc:
            st.boot_error = str(exc)
            log.warning("vocabulary not loaded yet: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    draft = None
    spec = st.cfg.speculative
    if spec.draft_model:
        try:
            draft = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: DraftModel(spec.draft_model, st.tokenizer, spec.draft_threads, st.cfg.batching.max_batch_size),
            )
        except DraftModelError as exc:
            # NOTE: refused for good: the coordinator stays unready and says why (readyz, log); with model_dir
            # set, `chatloop coordinator` refuses it before serving (main.py).
            st.boot_error = str(exc)
            log.error("%s", exc)
            return
        log.info("draft model %s loaded for speculative decoding", spec.draft_model)
    st.boot_error = None
    st.scheduler = Scheduler(st.cfg, st.cluster, st.tokenizer, st.metrics, draft)
    st.scheduler.start()
    log.info("coordinator ready to schedule for model %s", st.model_name)
