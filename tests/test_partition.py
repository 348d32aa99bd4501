"""Layer ranges: parsing ``--layers``, checking that ranges tile the model, and the byte-balanced default."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converters.partition import PartitionError, balance, check_ranges, parse_layers


def stage_costs(ranges, layer_bytes, first_extra=0, last_extra=0) -> list[int]:
    costs = [sum(layer_bytes[lo:hi]) for lo, hi in ranges]
    costs[0] += first_extra
    costs[-1] += last_extra
    return costs


def brute_force_best(layer_bytes, n_stages, first_extra=0, last_extra=0) -> int:
    """The smallest heaviest-stage cost over every way to cut the layers into ``n_stages`` ranges."""
    n = len(layer_bytes)
    best = None
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = (0, *cuts, n)
        ranges = list(zip(bounds, bounds[1:]))
        worst = max(stage_costs(ranges, layer_bytes, first_extra, last_extra))
        best = worst if best is None else min(best, worst)
    return best


# -- parse_layers / check_ranges ----------------------------------------------------------------------------


def test_parse_layers_accepts_a_tiling():
    assert parse_layers("0:10,10:20,20:30", 30) == [(0, 10), (10, 20), (20, 30)]
    assert parse_layers(" 0:1 , 1:30 ", 30) == [(0, 1), (1, 30)]
    assert parse_layers("0:30", 30) == [(0, 30)]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("0:10,11:30", ["gap", "10"]),
        ("0:10,9:30", ["overlap", "9"]),
        ("1:30", ["gap", "0"]),
        ("0:10,10:29", ["29", "30 layers"]),
        ("0:10,10:31", ["31", "30 layers"]),
        ("0:10,10:10,10:30", ["empty"]),
        ("0:10,10:5,5:30", ["reversed", "10:5"]),
        ("0-10,10-30", ["START:END"]),
        ("0:a,10:30", ["whole numbers"]),
        ("", ["START:END"]),
        ("0:10,,10:30", ["START:END"]),
    ],
)
def test_parse_layers_rejects(spec, words):
    with pytest.raises(PartitionError) as err:
        parse_layers(spec, 30)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_partition_error_is_a_value_error():
    assert issubclass(PartitionError, ValueError)


def test_check_ranges():
    check_ranges([(0, 3), (3, 6)], 6)
    for bad in ([(0, 3), (4, 6)], [(0, 4), (3, 6)], [(0, 6), (6, 6)], [(0, 5)], [(0, 3), (3, 7)], []):
        with pytest.raises(PartitionError):
            check_ranges(bad, 6)


# -- balance ----------------------------------------------------------------------------------------------


def test_balance_uniform_layers_split_evenly():
    assert balance([1] * 30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert balance([5] * 8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert balance([7] * 5, 1) == [(0, 5)]
    assert balance([7] * 5, 5) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_balance_counts_embedding_and_head():
    # A heavy embedding pushes layers off the first stage; a heavy head off the last.
    ranges = balance([10] * 10, 2, first_extra=40)
    assert ranges == [(0, 3), (3, 10)]
    ranges = balance([10] * 10, 2, last_extra=40)
    assert ranges == [(0, 7), (7, 10)]
    # SmolLM2-like: a tied embedding as heavy as 12 layers at both ends leaves the first stage one layer.
    ranges = balance([1] * 30, 4, first_extra=12, last_extra=12)
    assert ranges[0] == (0, 1)
    assert max(stage_costs(ranges, [1] * 30, 12, 12)) == 14


@pytest.mark.parametrize("n_stages", [0, -1, 6])
def test_balance_rejects_impossible_stage_counts(n_stages):
    with pytest.raises(PartitionError):
        balance([1] * 5, n_stages)


@settings(max_examples=300, deadline=None)
@given(
    layer_bytes=st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=9),
    data=st.data(),
    first_extra=st.integers(min_value=0, max_value=3000),
    last_extra=st.integers(min_value=0, max_value=3000),
)
def test_balance_is_optimal(layer_bytes, data, first_extra, last_extra):
    n_stages = data.draw(st.integers(min_value=1, max_value=len(layer_bytes)), label="n_stages")
    ranges = balance(layer_bytes, n_stages, first_extra, last_extra)
    # A valid tiling: contiguous, non-empty, covering every layer.
    assert len(ranges) == n_stages
    check_ranges(ranges, len(layer_bytes))
    # As good as the best of every possible tiling.
    worst = max(stage_costs(ranges, layer_bytes, first_extra, last_extra))
    assert worst == brute_force_best(layer_bytes, n_stages, first_extra, last_extra)
