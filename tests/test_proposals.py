"""Prompt lookup proposals (``coordinator/proposals.py``) on made-up token lists."""

from __future__ import annotations

import random

import pytest

from chatloop.coordinator.proposals import PromptLookup


def naive(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """The definition: the longest suffix (n_max .. n_min) with an earlier occurrence; its latest one's successors."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[len(tokens) - n :]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_copies_what_followed_the_suffix_before():
    text = [5, 6, 7, 8, 9, 10, 1, 2, 6, 7]
    assert PromptLookup(2, 4).propose(text, 3) == [8, 9, 10]
    assert PromptLookup(2, 4).propose(text, 10) == [8, 9, 10, 1, 2, 6, 7]


def test_longest_suffix_wins_and_latest_occurrence():
    # "3 4" occurs twice before; the 3-gram "2 3 4" only once, followed by 99.
    text = [2, 3, 4, 99, 0, 3, 4, 50, 1, 2, 3, 4]
    assert PromptLookup(2, 3).propose(text, 1) == [99]
    assert PromptLookup(2, 2).propose(text, 1) == [50]  # the latest "3 4"


def test_nothing_to_propose():
    lookup = PromptLookup(2, 4)
    assert lookup.propose([], 4) == []
    assert lookup.propose([1, 2], 4) == []
    assert lookup.propose([1, 2, 3, 4, 5], 4) == []
    assert lookup.propose([1, 2, 1, 2], 0) == []


def test_repeating_pattern_runs_into_the_suffix():
    assert PromptLookup(1, 2).propose([7, 7, 7], 4) == [7]
    assert PromptLookup(2, 2).propose([1, 2, 1, 2, 1, 2], 4) == [1, 2]


@pytest.mark.parametrize("seed", range(5))
def test_incremental_index_matches_the_definition(seed):
    rng = random.Random(seed)
    n_min, n_max = rng.choice([(1, 1), (1, 3), (2, 4), (3, 5)])
    tokens = [rng.randrange(6) for _ in range(8)]
    lookup = PromptLookup(n_min, n_max)
    for _ in range(300):
        k = rng.randrange(0, 9)
        assert lookup.propose(tokens, k) == naive(tokens, k, n_min, n_max), (tokens, k)
        tokens.extend(rng.randrange(6) for _ in range(rng.randrange(1, 4)))


def test_bad_sizes():
    with pytest.raises(ValueError):
        PromptLookup(0, 2)
    with pytest.raises(ValueError):
        PromptLookup(3, 2)
