"""A busy loop that keeps a core from idling without taking it from anybody (bench_idle_decode.py,
bench_pipeline_floor.py)."""

from __future__ import annotations

import os
import subprocess
import sys

_CODE = "import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True: pass"


def idle_loop(core: int) -> subprocess.Popen:
    """A busy loop pinned to ``core`` at SCHED_IDLE: it runs only when nothing else wants the core, so the core
    never idles, and yields at once to any other thread. Kill it when done."""
    return subprocess.Popen([sys.executable, "-c", _CODE], preexec_fn=lambda: os.sched_setaffinity(0, {core}))
