"""The prefix cache's index and eviction rules on made-up replicas (no processes): longest match, pins, slots,
the token bound, and forgetting a replica's entries."""

from __future__ import annotations

import pytest

from chatloop.coordinator.cluster import Replica
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.coordinator.prefix_cache import BLOCK, PrefixCache, block_hashes


def _replica(stage: int, name: str, slots: int = 4) -> Replica:
    r = Replica(stage, f"http://{name}")
    r.healthy = True
    r.info = {"max_sequences": slots}
    return r


@pytest.fixture
def setup():
    released: list[tuple[str, int]] = []
    metrics = CoordinatorMetrics("m")

    def slots_free(r: Replica) -> int:
        return r.info["max_sequences"] - r.sequences - r.cached

    def make(max_tokens: int = 0, exact: bool = True) -> PrefixCache:
        return PrefixCache(metrics, max_tokens, slots_free, lambda r, seq: released.append((r.url, seq)), exact)

    route = [_replica(0, "a"), _replica(1, "b")]
    return make, route, released, metrics


def _tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_block_hashes_chain_over_everything_before():
    a = block_hashes(_tokens(3 * BLOCK))
    b = block_hashes([999] + _tokens(3 * BLOCK)[1:])
    assert len(a) == 3 and all(x != y for x, y in zip(a, b))  # one changed token changes every later block
    assert block_hashes(_tokens(2 * BLOCK + 5)) == a[:2]


def test_longest_prefix_wins_in_whole_blocks_and_one_token_is_always_left(setup):
    make, route, _, _ = setup
    cache = make()
    system = _tokens(5 * BLOCK)
    assert cache.add(1, system[: 2 * BLOCK], route)
    assert cache.add(2, system + [7, 8, 9], route)
    prompt = system + [7, 8, 42, 43]
    hit = cache.lookup(prompt, lambda e: True)
    assert hit.entry.seq_id == 2 and hit.length == len(system)  # whole blocks only
    # A prompt of whole blocks equal to a cached entry still computes its last block.
    hit = cache.lookup(list(system), lambda e: True)
    assert hit.length == len(system) - BLOCK
    # Not usable (e.g. a busy replica): the next best entry.
    hit = cache.lookup(prompt, lambda e: e.seq_id != 2)
    assert hit.entry.seq_id == 1 and hit.length == 2 * BLOCK
    assert cache.lookup(_tokens(4 * BLOCK, start=500), lambda e: True) is None
    # Only an entry's reusable part counts (its prompt's whole blocks, not what it generated after).
    assert cache.add(3, _tokens(6 * BLOCK, start=900), route, reusable=2 * BLOCK)
    hit = cache.lookup(_tokens(6 * BLOCK, start=900) + [1], lambda e: True)
    assert hit.entry.seq_id == 3 and hit.length == 2 * BLOCK
    # Nor more than the new sequence's own whole prompt blocks.
    hit = cache.lookup(prompt, lambda e: True, block_end=3 * BLOCK)
    assert hit.length == 3 * BLOCK


def test_not_exact_reuses_every_cached_token_but_the_prompt_s_last(setup):
    make, route, _, _ = setup
    cache = make(exact=False)
    conversation = _tokens(3 * BLOCK + 40)  # a prompt and its reply: all of it holds KV
    assert cache.add(1, conversation, route, reusable=len(conversation))
    next_turn = conversation + [7, 8, 9]
    assert cache.lookup(next_turn, lambda e: True).length == len(conversation)  # off a block boundary
    assert cache.lookup(conversation, lambda e: True).length == len(conversation) - 1
    assert cache.lookup(conversation[:100] + [5] * 80, lambda e: True).length == 100
    exact = make()
    assert exact.add(2, conversation, route, reusable=3 * BLOCK)
    assert exact.lookup(next_turn, lambda e: True).length == 3 * BLOCK


def test_short_matches_are_not_worth_a_copy(setup):
    make, route, _, _ = setup
    cache = make()
    assert not cache.add(1, _tokens(BLOCK - 1), route)  # too short to keep
    cache.add(2, _tokens(3 * BLOCK), route)
    assert cache.lookup(_tokens(BLOCK - 1) + [999] * 40, lambda e: True) is None


def test_slots_evict_least_recently_used_but_never_a_pinned_entry(setup):
    make, route, released, metrics = setup
    cache = make()
    for seq in (1, 2, 3, 4):
        assert cache.add(seq, _tokens(2 * BLOCK, start=seq * 100), route)
    assert route[0].cached == 4
    hit = cache.lookup(_tokens(2 * BLOCK, start=100) + [5], lambda e: True)
    cache.pin(hit)  # entry 1: oldest, but in use
    assert cache.make_room(route[0])
    assert 1 in cache.entries and 2 not in cache.entries  # the oldest unpinned one went
    assert ("http://a", 2) in released and ("http://b", 2) in released  # freed in every stage of its route
    assert metrics.prefix_evictions._value.get() == 1
    route[0].sequences = 2
    assert cache.make_room(route[0])  # 4 slots: 2 running + entry 1 leave one free; evicts 3 and 4
    assert set(cache.entries) == {1}
    route[0].sequences = 3
    assert not cache.make_room(route[0])  # only the pinned entry is left
    cache.unpin(hit.entry)
    assert cache.make_room(route[0]) and not cache.entries


def test_token_bound(setup):
    make, route, _, _ = setup
    cache = make(max_tokens=3 * BLOCK)
    assert cache.add(1, _tokens(2 * BLOCK), route)
    assert cache.add(2, _tokens(2 * BLOCK, start=100), route)  # evicts 1
    assert set(cache.entries) == {2} and cache.tokens == 2 * BLOCK
    assert not cache.add(3, _tokens(4 * BLOCK), route)  # larger than the whole bound
    assert cache.evict_tokens(1) == 2 * BLOCK and cache.tokens == 0


def test_a_lost_replica_takes_its_entries_with_it(setup):
    make, route, released, _ = setup
    cache = make()
    other = [_replica(0, "c"), route[1]]
    cache.add(1, _tokens(2 * BLOCK), route)
    cache.add(2, _tokens(2 * BLOCK), other)
    cache.forget_replica(route[0], "restarted")
    assert set(cache.entries) == {2}
    assert ("http://b", 1) in released and ("http://a", 1) not in released
    assert route[0].cached == 0 and route[1].cached == 1
    hit = cache.lookup(_tokens(2 * BLOCK) + [1], lambda e: True)
    assert hit.entry.seq_id == 2
