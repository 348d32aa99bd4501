"""``chatloop serve``: starts everything, restarts a crashed stage (which rejoins), stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil

from chatloop.demo import demo_model_dir
from tests.cluster_harness import ROOT, free_port, http_json
from tests.waiting import wait_until


def test_serve_restarts_crashed_stage_and_stops_cleanly(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatloop.cli", "serve", str(demo_model_dir(2)), "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=log,
        cwd=ROOT,
        start_new_session=True,
    )
    try:

        def ready_line() -> dict | None:
            # NOTE: readline blocks until serve writes a line; a serve that hangs silently is caught by the
            # suite's per-test timeout (pytest-timeout), one that exits by the end of its output.
            line = proc.stdout.readline().decode()
            if not line and proc.poll() is not None:
                raise AssertionError(f"serve exited: {(tmp_path / 'serve.log').read_text()[-2000:]}")
            return json.loads(line) if line.startswith("{") else None

        ready = wait_until(ready_line, timeout=300, interval=0, what="chatloop serve's ready line")
        assert ready["url"] == f"http://127.0.0.1:{port}"
        url = ready["url"]
        status, body = http_json(f"{url}/v1/completions", {"prompt": "Hi", "max_tokens": 4, "temperature": 0})
        assert status == 200, body
        _, view = http_json(f"{url}/v1/cluster")
        victim = view["replicas"][1]
        os.kill(victim["pid"], signal.SIGKILL)

        def rejoined() -> bool:
            replica = http_json(f"{url}/v1/cluster")[1]["replicas"][1]
            # A fast restart may come back before enough probes failed to mark it unhealthy: the new pid is the proof.
            return replica["state"] == "healthy" and replica["pid"] not in (None, victim["pid"])

        wait_until(rejoined, timeout=120, what="restarted stage rejoined")
        status, body = http_json(f"{url}/v1/completions", {"prompt": "Hi", "max_tokens": 4, "temperature": 0})
        assert status == 200, body
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        gone, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, f"left running: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_runs_one_micro_batch_unless_stages_have_their_own_cores():
    from chatloop.config import ClusterConfig, ClusterStage
    from chatloop.serve import Supervisor

    def depth(**kw):
        sup = Supervisor(ClusterConfig(**kw), demo_model_dir(2))
        try:
            return sup._coordinator_batching().get("pipeline_depth")
        finally:
            sup.workdir.cleanup()

    assert depth() == 1  # stages share every core
    assert depth(stages=(ClusterStage(cpu_cores="0"), ClusterStage(cpu_cores="0-1"))) == 1  # overlapping cores
    assert depth(stages=(ClusterStage(cpu_cores="0"), ClusterStage(cpu_cores="1"))) is None  # own cores: default
    assert depth(coordinator={"batching": {"pipeline_depth": 3}}) == 3  # set by the user


def test_serve_takes_ring_steps_only_when_stages_have_their_own_cores():
    from chatloop.config import ClusterConfig, ClusterStage
    from chatloop.serve import Supervisor

    def ring(**kw):
        sup = Supervisor(ClusterConfig(**kw), demo_model_dir(2))
        try:
            return sup._coordinator_config([["http://127.0.0.1:1"], ["http://127.0.0.1:2"]])["ring_steps"]
        finally:
            sup.workdir.cleanup()

    own = (ClusterStage(cpu_cores="0"), ClusterStage(cpu_cores="1"))
    assert ring() is False  # stages share every core: routes going round on their own would compete for them
    assert ring(stages=(ClusterStage(cpu_cores="0"), ClusterStage(cpu_cores="0-1"))) is False
    assert ring(stages=own) is True
    assert ring(coordinator={"ring_steps": True}) is True  # set by the user
    assert ring(stages=own, coordinator={"ring_steps": False}) is False


def test_serve_lowers_the_coordinators_priority_only_when_stages_have_their_own_cores():
    from chatloop.config import ClusterConfig, ClusterStage
    from chatloop.serve import COORDINATOR_NICE, Supervisor

    def nice(**kw) -> int:
        sup = Supervisor(ClusterConfig(**kw), demo_model_dir(2))
        try:
            return sup._coordinator_nice()
        finally:
            sup.workdir.cleanup()

    assert nice() == 0  # stages share every core
    assert nice(stages=(ClusterStage(cpu_cores="0"), ClusterStage(cpu_cores="0-1"))) == 0
    assert nice(stages=(ClusterStage(cpu_cores="0"), ClusterStage(cpu_cores="1"))) == COORDINATOR_NICE > 0


def test_serve_passes_prompts_on_in_parts_only_when_stages_have_their_own_cores():
    from chatloop.config import ClusterConfig, ClusterStage, StageBatching
    from chatloop.serve import Supervisor

    def part_rows(**kw):
        sup = Supervisor(ClusterConfig(**kw), demo_model_dir(2))
        try:
            return sup._stage_batching()["prompt_part_rows"]
        finally:
            sup.workdir.cleanup()

    assert part_rows() == 0  # stages share every core: two of them computing at once would slow both
    assert part_rows(stage_defaults=StageBatching(prompt_part_rows=128)) == 0  # whatever the setting
    assert part_rows(stages=(ClusterStage(cpu_cores="0"), ClusterStage(cpu_cores="1"))) == 64
    own = (ClusterStage(cpu_cores="0"), ClusterStage(cpu_cores="1"))
    assert part_rows(stages=own, stage_defaults=StageBatching(prompt_part_rows=128)) == 128
