"""Failover in ``topology: chain`` with real processes (docs/design.md, "The chain data plane"): 3 stages with 2
replicas each; a middle-stage replica is killed (kill -9) or frozen (SIGSTOP) while 8 streams run through it. No
request is lost and greedy texts are unchanged; the frozen replica is found by the step deadline and a probe of
the route, and once resumed its late frames are dropped as stale by the next stage."""

from __future__ import annotations

import os
import pathlib
import signal

import pytest

from tests.cluster_harness import Cluster
from tests.test_failover import (
    assert_all_complete,
    busy_replica,
    check_kill9_mid_generation,
    replica_state,
    run_streams,
)
from tests.waiting import wait_until

# A short floor: a frozen replica is noticed after factor x the usual step time, at least 1 s (never 30 s).
CHAIN = {"topology": "chain", "step_timeout_floor_secs": 1.0, "step_timeout_factor": 20.0, "step_timeout_secs": 30.0}


@pytest.fixture
def chain3_r2(procs, model3, tmp_path):
    return Cluster(procs, model3, tmp_path, replicas=2, coordinator_extra=CHAIN).start()


def _log(proc) -> str:
    return pathlib.Path(proc.log_path).read_text(errors="replace")


def test_chain_kill9_middle_replica_mid_generation(chain3_r2):
    # Restarted, the replica rejoins: the coordinator registers its peers again and stage 0 reconnects to it.
    check_kill9_mid_generation(chain3_r2, 1)


def test_chain_sigstop_middle_replica_found_by_deadline_and_stale_once_resumed(chain3_r2):
    cluster = chain3_r2
    reference = run_streams(cluster.url)
    victim = {}

    def stop():
        url = busy_replica(cluster, 1)
        victim["url"] = url
        os.kill(cluster.stage_procs[url].pid, signal.SIGSTOP)

    try:
        results = run_streams(cluster.url, fault=stop)
        assert_all_complete(results, reference)
        wait_until(lambda: replica_state(cluster, victim["url"]) == "unhealthy", what="stopped replica unhealthy")
    finally:
        if "url" in victim:
            os.kill(cluster.stage_procs[victim["url"]].pid, signal.SIGCONT)
    # The coordinator found the frozen hop by the step deadline and a probe, not by a 30 s timeout.
    assert "no answer to a probe" in _log(cluster.coordinator)
    # Resumed, the replica passes on the steps it held; the next stage drops them as stale.
    next_stage = [cluster.stage_procs[u] for u in cluster.stage_urls[2]]
    wait_until(lambda: any("stale epoch" in _log(p) for p in next_stage), what="stale frames dropped")
    wait_until(lambda: replica_state(cluster, victim["url"]) == "healthy", what="rejoin after SIGCONT")
    assert_all_complete(run_streams(cluster.url), reference)


def test_chain_kill9_middle_replica_while_a_long_prompt_goes_through_in_parts(chain3_r2):
    """A long prompt crosses the stages in parts (stage/chain.py, protocol/chain.py ``split_parts``); kill -9 of the
    middle replica it is routed through while it is prefilled: the request is replayed elsewhere and completes with
    the whole model's greedy tokens."""
    import threading

    from tests.cluster_harness import http_json
    from tests.reference import whole_model_greedy

    cluster = chain3_r2
    prompt = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(90))
    with whole_model_greedy(16) as (tok, generate):
        assert len(tok.tokenize(prompt)) > 1000  # several 256-row chunks, each in four parts
        expected = generate(tok.tokenize(prompt))
    out = {}

    def ask() -> None:
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
        out["reply"] = http_json(f"{cluster.url}/v1/inference", body, timeout=600)

    asker = threading.Thread(target=ask)
    asker.start()

    def computing_replica() -> str | None:
        # the middle replica that holds KV of the prompt: it has taken parts of it (a prefill takes seconds)
        held = [url for url in cluster.stage_urls[1] if http_json(f"{url}/v1/info")[1]["live_sequences"] > 0]
        return held[0] if held else None

    victim = wait_until(computing_replica, interval=0.02, what="the prompt's parts on a middle replica")
    cluster.stage_procs[victim].send_signal(signal.SIGKILL)
    asker.join(600)
    status, body = out["reply"]
    assert status == 200, body
    assert body["tokens"] == expected
