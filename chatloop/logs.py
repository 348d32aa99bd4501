"""Logs: one JSON object a line (timestamp, level, target, message, request_id, trace_id) for collectors, or
readable lines (time, level, message) for a person at a terminal.

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


class ReadableFormatter(logging.Formatter):
    """``12:03:04.567 INFO    stage       message  [request_id]``; the level in colour on a colour terminal.

    The component (stage, coordinator, serve, ...) tells apart the processes of ``chatloop serve``, which all
    write to the same terminal."""

    COLOURS = {"DEBUG": "2", "INFO": "36", "WARNING": "33", "ERROR": "31", "CRITICAL": "1;31"}

    def __init__(self, colour: bool = False, component: str | None = None) -> None:
        super().__init__()
        self.colour = colour
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        level = f"{record.levelname:<7}"
        if self.colour:
            level = f"\033[{self.COLOURS.get(record.levelname, '0')}m{level}\033[0m"
        line = f"{stamp} {level} {self.component or _component(record.name):<11} {record.getMessage()}"
        rid = request_id_var.get()
        if rid:
            line += f"  [{rid}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _component(name: str) -> str:
    parts = name.split(".")
    return parts[1] if parts[0] == "chatloop" and len(parts) > 1 else parts[0]


LOG_FORMATS = ("auto", "json", "text")


def resolve_format(fmt: str | None, stream=None) -> str:
    """ "json" or "text": ``fmt``, else $CHATLOOP_LOG_FORMAT, else "auto" = text on a terminal, JSON otherwise."""
    fmt = fmt or os.environ.get("CHATLOOP_LOG_FORMAT") or "auto"
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")
    if fmt == "auto":
        stream = stream or sys.stderr
        return "text" if hasattr(stream, "isatty") and stream.isatty() else "json"
    return fmt


def setup_logging(level: str = "INFO", fmt: str | None = None, component: str | None = None) -> None:
    """Configure the root logger; ``fmt`` is "json", "text" or "auto" (see ``resolve_format``); ``component`` names
    this process in readable lines (default: taken from each logger's name)."""
    handler = logging.StreamHandler(sys.stderr)
    if resolve_format(fmt, sys.stderr) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        colour = sys.stderr.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        handler.setFormatter(ReadableFormatter(colour, component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level_value = logging.getLevelName(str(level).upper())
    if not isinstance(level_value, int):
        raise ValueError(f"log level {level!r}: expected DEBUG, INFO, WARNING or ERROR")
    root.setLevel(level_value)
    for noisy in ("aiohttp.access", "gguf.gguf_writer", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(level_value, logging.WARNING))
