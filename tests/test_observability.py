"""Structured logs and trace propagation across real processes."""

from __future__ import annotations

import json
import pathlib

from chatloop.demo import demo_model_dir
from tests.cluster_harness import Cluster, http_json
from tests.waiting import wait_until

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _json_lines(path: str) -> list[dict]:
    out = []
    for line in pathlib.Path(path).read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_traceparent_reaches_every_stage_and_logs_are_json(procs, tmp_path):
    cluster = Cluster(procs, demo_model_dir(2), tmp_path, stage_extra={"observability": {"log_level": "DEBUG"}}).start()
    status, body = http_json(
        f"{cluster.url}/v1/completions",
        {"prompt": "Hi", "max_tokens": 3, "temperature": 0},
        headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01", "X-Request-Id": "req-42"},
    )
    assert status == 200, body
    stage_logs = [proc.log_path for proc in cluster.stage_procs.values()]

    def traced(path) -> bool:
        return any(e.get("trace_id") == TRACE and "forward" in e["message"] for e in _json_lines(path))

    # Each process writes its lines when it gets to them: wait for them rather than for a fixed time.
    coord = wait_until(
        lambda: [e for e in _json_lines(cluster.coordinator.log_path) if e.get("trace_id") == TRACE],
        what="the coordinator's log lines of the traced request",
    )
    assert any(e.get("request_id") == "req-42" for e in coord), coord
    for path in stage_logs:
        wait_until(lambda path=path: traced(path), what=f"a traced forward line in {path}")
    lines = _json_lines(cluster.coordinator.log_path)
    assert all({"timestamp", "level", "target", "message"} <= set(e) for e in lines)
