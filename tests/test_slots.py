"""Slot placement and llama.cpp's ubatch split (chatloop/engine/slots.py), on made-up slots."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chatloop.engine.slots import compaction, count_passes, pick_slot, reclaimable, runs, ubatch_groups, ubatch_order


def test_ubatch_groups_follow_split_equal():
    # Consecutive ids, one row each: one ubatch.
    assert ubatch_groups([0, 1, 2, 3], 512) == [[0, 1, 2, 3]]
    # Scattered ids: one ubatch per run of consecutive ids.
    assert ubatch_groups([0, 2, 4, 6], 512) == [[0], [1], [2], [3]]
    # Equal rows per sequence: the rows of a ubatch go sequence by sequence.
    assert ubatch_groups([0, 0, 1, 1], 512) == [[0, 1, 2, 3]]
    # Uneven rows: the first ubatch takes as many rows from each as the shortest has, the rest follow.
    assert ubatch_groups([0, 1, 1, 1], 512) == [[0, 1], [2, 3]]
    # n_ubatch caps the rows per ubatch.
    assert ubatch_groups([5, 5, 5, 5, 5], 2) == [[0, 1], [2, 3], [4]]
    assert ubatch_order([0, 1, 0, 1], 512) == [0, 2, 1, 3]


def test_runs_count_consecutive_stretches():
    assert runs(set()) == 0
    assert runs({3}) == 1
    assert runs({0, 1, 2}) == 1
    assert runs({0, 2, 3, 7}) == 3


def test_a_new_group_starts_where_it_has_room_to_grow():
    assert pick_slot(set(range(16)), set()) == 0  # nothing below: start at the bottom
    assert pick_slot(set(range(1, 16)), set()) == 8  # share 1..15 with the group at 0
    assert pick_slot(set(range(16)) - {10}, set()) == 0  # 0..9 is longer than 11..15
    assert pick_slot({1, 2, 5, 6, 7, 8}, set()) == 7  # 5..8 is the longest


def test_mates_fill_a_hole_first_then_grow_at_an_end():
    free = {0, 2, 5, 6, 7}
    assert pick_slot(free, {1, 3, 4}) == 2  # closes the hole: one run
    assert pick_slot({0, 5, 6, 7}, {1, 2, 3, 4}) == 5  # both ends keep one run: the one with room to grow
    assert pick_slot({0, 5}, {1, 2, 3, 4}) == 0  # as much room either way: the lowest
    assert pick_slot({6, 7}, {1, 2, 3}) == 6  # no slot keeps one run: the nearest


def test_two_micro_batches_admitted_in_turn_get_a_stretch_each():
    """Sequences of micro-batches A and B arrive alternately (A's first, B's first, A's second with A's first,
    ...): lowest-free-first would give A the even slots and B the odd ones, four passes per decode each."""
    free = set(range(8))
    groups: dict[str, set[int]] = {"A": set(), "B": set()}
    for _ in range(4):
        for name in ("A", "B"):
            slot = pick_slot(free, groups[name])
            free.remove(slot)
            groups[name].add(slot)
    assert runs(groups["A"]) == 1 and runs(groups["B"]) == 1
    assert groups["A"] | groups["B"] == set(range(8))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=12), st.sampled_from([1, 4, 16, 512]))
def test_count_passes_agrees_with_the_split(rows, n_ubatch):
    slots = [i for i, r in enumerate(rows) for _ in range(r)]
    assert count_passes(rows, n_ubatch) == len(ubatch_groups(slots, n_ubatch))


def test_reclaimable_gives_an_idle_slot_inside_the_group_only_when_no_free_slot_joins():
    # Group at 0, 2, 3 (1 held by an idle cache entry); the free slots are far away: take 1, move its occupant.
    assert reclaimable({6, 7}, {0, 2, 3}, {1, 5}) == 1
    # Next to the group's end, when nothing free is: the nearest idle slot that keeps one run.
    assert reclaimable({9, 10}, {0, 1, 2}, {3, 6}) == 3
    # A free slot that joins anyway: nothing to move.
    assert reclaimable({1, 7}, {0, 2, 3}, {5}) is None
    # One free slot is enough: the occupant moves into it (a stage whose other slots hold cache entries).
    assert reclaimable({7}, {0, 2, 3}, {1}) == 1
    # No idle slot joins, or nowhere to move one to, or no group yet (a new micro-batch): nothing.
    assert reclaimable({6, 7}, {0, 2, 3}, {5}) is None
    assert reclaimable(set(), {0, 2, 3}, {1}) is None
    assert reclaimable({6, 7}, set(), {1}) is None


def test_compaction_closes_free_holes_inside_a_group():
    # 1 and 2 ended (free): the last members move into the holes, lowest hole first.
    assert compaction({0, 3, 4}, {1, 2, 5, 6}) == [(4, 1), (3, 2)]
    # A hole held by another sequence (not free) stays; nothing gained: no moves.
    assert compaction({0, 2}, {5}) == []
    assert compaction({0, 1, 2}, {3, 4}) == []  # one run already
    # A move that leaves as many runs is not made: {0, 1, 4, 5} with 2 free -> {0, 1, 2, 4} is still two runs.
    assert compaction({0, 1, 4, 5}, {2}) == []
    assert compaction({7}, {0, 1}) == [] and compaction(set(), {0}) == []
