"""Structured logs: one JSON object a line (timestamp, level, target, message, request_id, trace_id).

``request_id`` and ``trace_id`` come from context variables that the HTTP handlers set, so every log line
written while serving a request carries them without being passed around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
trace_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        rid, tid = request_id_var.get(), trace_id_var.get()
        if rid:
            entry["request_id"] = rid
        if tid:
            entry["trace_id"] = tid
        for key in ("stage", "worker", "component"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Configure the root logger; ``fmt`` is "json" or "text" (default: $CHATLOOP_LOG_FORMAT or json)."""
    fmt = fmt or os.environ.get("CHATLOOP_LOG_FORMAT", "json")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level_value = logging.getLevelName(str(level).upper())
    if not isinstance(level_value, int):
        raise ValueError(f"log level {level!r}: expected DEBUG, INFO, WARNING or ERROR")
    root.setLevel(level_value)
    for noisy in ("aiohttp.access", "gguf.gguf_writer", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(level_value, logging.WARNING))
