"""Speculative decoding and failover with real processes: a replica killed while copy-heavy streams speculate.

Its own module, so that no other cluster of the serving tests is alive while its four stages start.
"""

from __future__ import annotations

import signal

from chatloop.demo import demo_model_dir
from tests.cluster_harness import Cluster
from tests.test_failover import HUNG_REPLICA, assert_all_complete, busy_replica, run_streams
from tests.test_speculation_serving import COPY_PROMPTS, N_TOKENS, SPECULATIVE, _spec_view


def test_failover_mid_generation_with_speculation(procs, tmp_path):
    """A replica killed while copy-heavy streams speculate: they replay on the other one, same text."""
    cluster = Cluster(
        procs, demo_model_dir(2), tmp_path, replicas=2, coordinator_extra={**HUNG_REPLICA, **SPECULATIVE}
    ).start()
    prompts = COPY_PROMPTS * 2
    reference = run_streams(cluster.url, prompts=prompts, max_tokens=N_TOKENS)

    def kill():
        cluster.stage_procs[busy_replica(cluster, 1)].send_signal(signal.SIGKILL)

    results = run_streams(cluster.url, fault=kill, prompts=prompts, max_tokens=N_TOKENS)
    assert_all_complete(results, reference)
    assert _spec_view(cluster)["accepted_tokens"] > 0
