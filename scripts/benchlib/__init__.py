"""Shared pieces of the serving benchmarks (bench_serve.py, bench_load.py, soak.py), one job per module.

- ``children``: the benchmark's child processes (``chatloop.launcher`` with the benchmarks' defaults).
- ``omp``: the OpenMP environment of llama.cpp processes.
- ``cluster``: stage processes plus a coordinator of a converted model on loopback (``ChatLoopCluster``).
- ``llama_server``: llama.cpp's own ``llama-server``: find, build once, run (``LlamaServer``).
- ``client``: one streamed ``POST /v1/completions``, timed per chunk (``stream_completion``).
- ``load``: closed-loop load over many clients and its summary (``run_load``, ``LoadResult``).
- ``in_process``: the whole model in this process, timed per token (``InProcess``).
- ``stats``: percentiles, CPU seconds of processes, a stage's ``/metrics`` counters.
- ``options``: comma-separated configuration lists on the command line, checked.
- ``idle_loop``: a SCHED_IDLE busy loop that keeps a core from idling.

Every child process runs in its own session, is stopped with its process group, and gets SIGTERM if the
benchmark itself dies.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
# The scripts run as ``python scripts/x.py``: make the repository's packages importable.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
