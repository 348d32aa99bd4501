"""The benchmark scripts' configuration choices that mirror `chatloop serve` or refuse a bad command line.

Benchmarks compare what users run: a cluster started by the benchmarks must take ring steps exactly where `chatloop
serve` would (only with every stage pinned to a core of its own, chatloop/serve.py), unless a variant says otherwise.
"""

from __future__ import annotations

import os

import pytest

from scripts import bench_load, bench_pipeline_floor

ChatLoopVariant = bench_load.ChatLoopVariant  # scripts/benchlib/cluster.py, as the benchmarks import it


def test_a_chain_takes_ring_steps_as_serve_does_unless_told():
    cores = os.cpu_count() or 1
    assert ChatLoopVariant(topology="chain", pin=True).ring_steps(min(2, cores))
    assert not ChatLoopVariant(topology="chain", pin=False).ring_steps(2)  # stages share every core
    assert not ChatLoopVariant(topology="chain", pin=True).ring_steps(cores + 1)  # two stages on one core
    assert ChatLoopVariant(topology="chain", pin=False, ring=True).ring_steps(2)
    assert not ChatLoopVariant(topology="chain", pin=True, ring=False).ring_steps(2)
    assert not ChatLoopVariant(topology="star", pin=True, ring=True).ring_steps(2)


def test_variant_list_entries_choose_ring_steps():
    assert bench_load.parse_variant("2/1/0/spin20000/chain").ring is None
    assert bench_load.parse_variant("2/1/0/spin20000/chain/ring").ring is True
    assert bench_load.parse_variant("2/1/0/spin20000/chain/no-ring").ring is False
    with pytest.raises(SystemExit, match="ring\\|/no-ring"):
        bench_load.parse_variant("2/1/0/spin20000/chain/ring/no-ring")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cores", "one", "--no-pin"], "cannot go with --no-pin"),
        (["--cores", "two"], "--cores: expected some of own,one"),
    ],
)
def test_the_floor_refuses_placements_it_cannot_run(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_pipeline_floor.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
