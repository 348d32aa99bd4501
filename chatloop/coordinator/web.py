"""The browser pages the coordinator serves: a chat (``GET /``) and a live view of the pipeline (``GET /cluster``).

The pages are static files shipped inside the package (``chatloop/coordinator/static/``), plain JavaScript with no
build step and nothing fetched from elsewhere. They talk to the same API as any client: ``/v1/chat/completions``
for the chat, ``/v1/cluster/live`` (below) for the cluster view, polled, so an API key travels as a bearer token
(an EventSource could not send one). The pages themselves need no key: they ask for one when the API answers 401.

Every page and asset goes out with a Content-Security-Policy that allows scripts, styles and connections from this
origin only and no inline script, so even a rendering bug could not run text a model wrote.
"""

from __future__ import annotations

import logging
import pathlib
import time
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger(__name__)

STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"
# URL -> (file, content type). A fixed list, not a directory handler: nothing else under static/ is reachable,
# and the API-key middleware can leave exactly these paths open.
PAGES = {
    "/": ("index.html", "text/html"),
    "/cluster": ("cluster.html", "text/html"),
    "/static/style.css": ("style.css", "text/css"),
    "/static/markdown.js": ("markdown.js", "text/javascript"),
    "/static/api.js": ("api.js", "text/javascript"),
    "/static/chat.js": ("chat.js", "text/javascript"),
    "/static/cluster.js": ("cluster.js", "text/javascript"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
WEB_PATHS = tuple(PAGES)  # open without an API key (the live view is API and needs one)
LIVE_PATH = "/v1/cluster/live"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


@dataclass
class _BusyMemo:
    """Per replica: the stage's cumulative decode time at its last two probes, to turn into a busy share."""

    seen: float | None = None
    decode_seconds: float | None = None
    share: float | None = None


@dataclass
class WebState:
    files: dict[str, bytes]
    busy: dict[str, _BusyMemo] = field(default_factory=dict)


WEB_STATE = web.AppKey("web_state", WebState)


def _load_files() -> dict[str, bytes]:
    files = {}
    for name, _ in PAGES.values():
        path = STATIC_DIR / name
        try:
            files[name] = path.read_bytes()
        except OSError as exc:
            # A broken install must not stop the API: the page answers 500 naming the missing file.
            log.error("web page file missing: %s (%s)", path, exc)
    return files


def add_web_routes(app: web.Application, state_key: web.AppKey) -> None:
    """Add the pages and ``GET /v1/cluster/live``; ``state_key`` is the coordinator's state in ``app``."""
    app[WEB_STATE] = WebState(files=_load_files())
    for path, (name, ctype) in PAGES.items():
        app.router.add_get(path, _page_handler(name, ctype))

    async def live(request: web.Request) -> web.Response:
        st = request.app[state_key]
        body = live_view(st, request.app[WEB_STATE])
        return web.json_response(body, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    app.router.add_get(LIVE_PATH, live)


def _page_handler(name: str, ctype: str):
    async def handler(request: web.Request) -> web.Response:
        data = request.app[WEB_STATE].files.get(name)
        if data is None:
            return web.Response(status=500, text=f"chatloop is installed without its web file {name}")
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
        return web.Response(body=data, content_type=ctype, charset="utf-8", headers=headers)

    return handler


# -- the live view -------------------------------------------------------------------------------------


def live_view(st, web_state: WebState) -> dict:
    """Everything the cluster page draws: stages left to right, their replicas, the coordinator's figures.

    ``st`` is the coordinator's state (cluster, scheduler, metrics, cfg, model_name, draining)."""
    sched = st.scheduler
    stages = []
    for k, reps in enumerate(st.cluster.stages):
        replicas = [_replica(r, web_state) for r in reps]
        known = next((r.info for r in reps if r.info), {})
        stages.append(
            {
                "index": k,
                "layers": [known.get("layer_start"), known.get("layer_end")] if known else None,
                "file_bytes": known.get("file_bytes"),
                "has_embedding": known.get("has_embedding"),
                "has_head": known.get("has_head"),
                "replicas": replicas,
            }
        )
    n_layer = next((r.info.get("n_layer_total") for r in st.cluster.replicas if r.info), None)
    return {
        "model": st.model_name,
        "ready": st.cluster.ready() and not st.draining and sched is not None,
        "draining": st.draining,
        "n_layer": n_layer,
        "health_check_interval_secs": st.cfg.health_check_interval_secs,
        "stages": stages,
        "coordinator": {
            "running": len(sched.active) if sched else 0,
            "waiting": len(sched.waiting) if sched else 0,
            "max_running": sched.max_active() if sched else None,
            **st.metrics.live.snapshot(),
        },
        "time": time.time(),
    }


def _replica(r, web_state: WebState) -> dict:
    info = r.info or {}
    return {
        "name": r.name,
        "url": r.url,
        "state": r.state(),
        "consecutive_failures": r.failures,
        "last_error": r.last_error,
        "last_seen": r.last_seen,
        "routed_sequences": r.sequences,
        "live_sequences": info.get("live_sequences"),
        "max_sequences": info.get("max_sequences"),
        "queue_depth": info.get("queue_depth"),
        "kv_tokens_used": info.get("kv_tokens_used"),
        "kv_tokens_total": info.get("n_ctx"),
        "rss_bytes": info.get("rss_bytes"),
        "threads": info.get("threads"),
        "pid": info.get("pid"),
        "busy_share": _busy_share(r, info, web_state),
    }


def _busy_share(r, info: dict, web_state: WebState) -> float | None:
    """Share of wall time the stage spent in llama_decode between the coordinator's last two probes of it."""
    memo = web_state.busy.setdefault(r.url, _BusyMemo())
    seen, dec = r.last_seen, info.get("decode_seconds")
    if seen is None or dec is None or seen == memo.seen:
        return memo.share if r.healthy else None
    if memo.seen is not None and memo.decode_seconds is not None and seen > memo.seen and dec >= memo.decode_seconds:
        memo.share = round(min(1.0, (dec - memo.decode_seconds) / (seen - memo.seen)), 3)
    else:
        memo.share = None  # first probe, or the stage restarted (its counter started over)
    memo.seen, memo.decode_seconds = seen, dec
    return memo.share


def openapi_paths() -> dict:
    """The OpenAPI entries of these routes (merged into ``/openapi.json``)."""
    paths: dict = {}
    for path, (name, ctype) in PAGES.items():
        summary = {"/": "Chat page", "/cluster": "Live cluster page"}.get(path, f"Web page asset {name}")
        ok = {"description": "OK", "content": {ctype: {"schema": {"type": "string"}}}}
        paths[path] = {"get": {"summary": summary, "responses": {"200": ok}}}
    live = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    err = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    paths[LIVE_PATH] = {
        "get": {
            "summary": "Stages, replicas and the coordinator's figures of the last minute (the cluster page's data)",
            "responses": {"200": live, "401": err},
        }
    }
    return paths
