"""The coordinator's shared state (one per app, under ``STATE``) and its readiness rule."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from aiohttp import web

from chatloop.config import CoordinatorConfig
from chatloop.coordinator.chat_template import ChatTemplate
from chatloop.coordinator.cluster import Cluster
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.scheduler import Scheduler
from chatloop.coordinator.tool_prompt import TemplateTools
from chatloop.coordinator.web import WEB_PATHS
from chatloop.engine.tokenizer import Tokenizer


@dataclass
class CoordinatorState:
    cfg: CoordinatorConfig
    metrics: CoordinatorMetrics
    cluster: Cluster
    model_name: str
    tokenizer: Tokenizer | None = None
    template: ChatTemplate | None = None
    tool_caps: TemplateTools | None = None  # what the chat template does with tools (tool_prompt.probe)
    scheduler: Scheduler | None = None
    draining: bool = False
    boot_error: str | None = None
    tmpdir: tempfile.TemporaryDirectory | None = None
    tasks: set = field(default_factory=set)


STATE = web.AppKey("coordinator_state", CoordinatorState)
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json", *WEB_PATHS)  # the pages ask for the key


def ready_problem(st: CoordinatorState) -> str | None:
    if st.draining:
        return "coordinator is draining"
    if st.tokenizer is None or st.scheduler is None:
        return f"starting: {st.boot_error or 'loading the vocabulary'}"
    if not st.cluster.ready():
        down = [k for k, reps in enumerate(st.cluster.stages) if not any(r.routable() for r in reps)]
        return f"not ready: no healthy replica for stage(s) {down}"
    return None
