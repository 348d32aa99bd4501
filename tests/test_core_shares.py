"""How ``chatloop serve`` divides the cores between replicas of a stage (chatloop/core_shares.py)."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import yaml

from chatloop.config import ClusterConfig, ClusterStage, Performance
from chatloop.core_shares import auto_replica_shares, format_cores, replica_core_shares, usable_cores
from chatloop.serve import Supervisor


@pytest.mark.parametrize(
    ("replicas", "cores", "expected"),
    [
        (1, [0, 1], [(0, 1)]),
        (2, [0, 1], [(0,), (1,)]),
        (2, [0, 1, 2, 3], [(0, 1), (2, 3)]),
        (3, range(8), [(0, 1, 2), (3, 4, 5), (6, 7)]),
        (2, [4, 2, 6, 3], [(2, 3), (4, 6)]),  # an affinity mask with gaps: sorted, contiguous in it
        (3, [0, 1], [(0,), (1,), (0,)]),  # more replicas than cores: one core each, shared as evenly as possible
    ],
)
def test_replica_core_shares(replicas: int, cores, expected) -> None:
    shares = replica_core_shares(replicas, cores)
    assert shares == expected
    if replicas <= len(list(cores)):
        flat = [c for s in shares for c in s]
        assert len(flat) == len(set(flat)) == len(set(cores)), "disjoint and covering every core"


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="replicas must be 1 or more"):
        replica_core_shares(0, [0, 1])
    with pytest.raises(ValueError, match="no cores"):
        replica_core_shares(2, [])


@pytest.mark.parametrize(("share", "text"), [((0,), "0"), ((0, 1, 2), "0-2"), ((0, 2, 3, 4, 7), "0,2-4,7")])
def test_format_cores(share, text) -> None:
    assert format_cores(share) == text


def test_only_unconfigured_stages_with_replicas_are_divided() -> None:
    two = ClusterConfig(stages=(ClusterStage(replicas=2), ClusterStage(replicas=1)))
    assert auto_replica_shares(two, 0, [0, 1]) == [(0,), (1,)]
    assert auto_replica_shares(two, 1, [0, 1]) is None  # one replica: all cores, as before
    assert auto_replica_shares(two, 5, [0, 1]) is None  # no entry: one replica
    explicit = [
        dataclasses.replace(two, stages=(ClusterStage(replicas=2, n_threads=2),)),
        dataclasses.replace(two, stages=(ClusterStage(replicas=2, cpu_cores="0-1"),)),
        dataclasses.replace(two, performance=Performance(n_threads=1)),
        dataclasses.replace(two, performance=Performance(cpu_cores="0")),
        dataclasses.replace(two, performance=Performance(numa_node=0)),
    ]
    for cfg in explicit:
        assert auto_replica_shares(cfg, 0, [0, 1]) is None, cfg


def test_serve_writes_the_shares_into_each_replica_config(stage_dir, tiny_llama_gguf) -> None:
    cfg = ClusterConfig(stages=(ClusterStage(replicas=2), ClusterStage(replicas=2)))
    sup = Supervisor(cfg, stage_dir(tiny_llama_gguf))
    try:
        groups = sup._stage_children()
        perf = {
            c.name: yaml.safe_load(pathlib.Path(c.cmd[c.cmd.index("--config") + 1]).read_text())["performance"]
            for g in groups
            for c in g
        }
    finally:
        sup.workdir.cleanup()
    shares = replica_core_shares(2, usable_cores())
    for stage in (0, 1):  # stages at different positions use the same shares: they decode in turn
        for r in (0, 1):
            p = perf[f"stage-{stage}-r{r}"]
            assert p["enable_cpu_pinning"] is True
            assert p["cpu_cores"] == format_cores(shares[r]) and p["n_threads"] == len(shares[r])
