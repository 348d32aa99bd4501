"""KV slots: how llama.cpp splits a batch of slots into ubatches, and which slot a new sequence gets.

Every sequence holds one KV stream of its own (``kv_unified`` False, runtime.py). llama.cpp then splits a
batch with ``split_equal``, which puts only sequences with consecutive ids into one ubatch: four sequences of one
row at slots 0, 1, 2, 3 are one pass over the weights, at slots 0, 2, 4, 6 four passes (measured: 1.34 x the
time of the consecutive ones at Q4_1, 2.09 x at Q4_0; 1 thread, stage 0 of the demo, scripts/bench_rows.py).
The sequences stepped together (a coordinator's micro-batch) should therefore hold consecutive slots, whatever
order they arrived in: with two micro-batches admitted in turn, lowest-free-first gives one the even slots and
the other the odd ones.
"""

from __future__ import annotations


def ubatch_groups(slots: list[int], n_ubatch: int) -> list[list[int]]:
    """The batch rows (indices into ``slots``) of each ubatch, in the order llama.cpp computes them.

    A Python copy of ``llama_batch_allocr::split_equal(n_ubatch, sequential=true)`` (llama.cpp
    src/llama-batch.cpp, as vendored by llama-cpp-python 0.3.36) for batches in which each row belongs to
    one sequence: a ubatch takes sequences with consecutive ids in order of first appearance, the same
    number of rows from each, and lays them out sequence by sequence. The eval callback sees rows in
    this order. Tests hold it to llama.cpp by comparing mixed batches with sequences run one at a time.
    """
    rows_of: dict[int, list[int]] = {}
    for i, s in enumerate(slots):
        rows_of.setdefault(s, []).append(i)
    used = [False] * len(slots)
    next_row = {s: 0 for s in rows_of}
    groups: list[list[int]] = []
    done = 0
    while done < len(slots):
        seqs: list[int] = []
        for i, s in enumerate(slots):
            if used[i] or s in seqs:
                continue
            if seqs and s != seqs[-1] + 1:
                continue
            seqs.append(s)
            if len(seqs) > n_ubatch:
                break
        per_seq: list[list[int]] = [[] for _ in seqs]
        while all(next_row[s] < len(rows_of[s]) for s in seqs):
            for k, s in enumerate(seqs):
                idx = rows_of[s][next_row[s]]
                per_seq[k].append(idx)
                used[idx] = True
                next_row[s] += 1
            if (len(per_seq[0]) + 1) * len(seqs) > n_ubatch:
                break
        group = [idx for rows in per_seq for idx in rows]
        done += len(group)
        groups.append(group)
    return groups


def ubatch_order(slots: list[int], n_ubatch: int) -> list[int]:
    """The batch rows in the order llama.cpp computes them (``ubatch_groups`` one after the other)."""
    return [idx for group in ubatch_groups(slots, n_ubatch) for idx in group]


def runs(slots: set[int]) -> int:
    """Maximal runs of consecutive ids: the ubatches a decode of one row per sequence takes."""
    return sum(1 for s in slots if s - 1 not in slots)


def pick_slot(free: set[int], mates: set[int]) -> int:
    """The slot for a sequence new to this stage, stepped together with sequences at slots ``mates``.

    With mates: the free slot that leaves them in the fewest runs (a hole inside their range or a slot at either
    end), then the nearest to them, then the one in the longest free stretch (the group grows where it has room,
    away from its neighbours), then the lowest. Without (the first sequence of a new micro-batch): in the longest
    free stretch, its first slot if that is slot 0 (nothing below to share the room with), else its middle, so
    that this group and the one below it both have room to grow.
    """
    if not free:
        raise ValueError("no free slot")
    stretch = free_stretches(free)
    if mates:
        lo, hi = min(mates), max(mates)
        return min(free, key=lambda s: (runs(mates | {s}), max(lo - s, s - hi, 0), -stretch[s][1], s))
    start, length = max(set(stretch.values()), key=lambda run: (run[1], -run[0]))
    return start if start == 0 else start + length // 2


def reclaimable(free: set[int], mates: set[int], idle: set[int]) -> int | None:
    """The slot of an idle sequence that a new sequence stepped with ``mates`` should take, its occupant moved to a
    free slot, because it leaves the group in fewer runs of consecutive slots than any free slot would (each run is
    one more pass over the weights on each of the group's steps): of those, the one leaving fewest runs, then the
    nearest. None when no idle slot does better, or when no free slot is left to move the occupant to (one is
    enough: the occupant moves into the slot the new sequence would have had).

    NOTE: idle sequences are mostly the coordinator's prefix-cache entries, which hold KV but never step; when a
    request ended, its entry kept the slot inside its micro-batch and the next request of that micro-batch went
    elsewhere. At concurrency 8 on a 1B-class model two thirds of the decode steps took 3 passes instead of 1
    (scripts/README.md, "Session 11")."""
    if not mates or not free:
        return None
    with_free = runs(mates | {pick_slot(free, mates)})
    lo, hi = min(mates), max(mates)
    better = [s for s in idle if runs(mates | {s}) < with_free]
    return min(better, key=lambda s: (runs(mates | {s}), max(lo - s, s - hi, 0), s)) if better else None


def compaction(group: set[int], free: set[int]) -> list[tuple[int, int]]:
    """Moves (from slot, to slot) that close the free holes inside the span of a group stepped together, each time
    its highest slot into its lowest free hole; none unless they leave the group in fewer runs. Holes appear when
    members end (released) in the middle of their micro-batch and no newcomer takes their slots: each run left is
    one more pass over the weights on every step of the group. Holes held by other sequences stay as they are."""
    members, spare = set(group), set(free)
    moves: list[tuple[int, int]] = []
    while len(members) > 1:
        lo, hi = min(members), max(members)
        holes = [s for s in spare if lo < s < hi]
        if not holes:
            break
        hole = min(holes)
        moves.append((hi, hole))
        members ^= {hi, hole}
        spare ^= {hi, hole}
    return moves if moves and runs(members) < runs(group) else []


def free_stretches(free: set[int]) -> dict[int, tuple[int, int]]:
    """For each free slot, the (first slot, length) of the run of free slots it belongs to."""
    out: dict[int, tuple[int, int]] = {}
    for s in sorted(free):
        if s - 1 in free:
            continue
        length = 1
        while s + length in free:
            length += 1
        for k in range(s, s + length):
            out[k] = (s, length)
    return out


def count_passes(rows: list[int], n_ubatch: int = 512) -> int:
    """Ubatches of a batch whose sequences hold consecutive slots, in slot order, ``rows[i]`` rows each: what
    ``ubatch_groups`` gives for it, in O(sequences x ubatches) (the speculation policy prices its drafts with it).

    Each ubatch takes the lowest-slot sequences that still have rows, as far as they run on without a gap, and
    as many rows from each as the fewest of them has left (at most ``n_ubatch`` rows in all).
    """
    left = list(rows)
    count = 0
    first = 0
    while True:
        while first < len(left) and not left[first]:
            first += 1
        if first == len(left):
            return count
        end = first
        # NOTE: split_equal stops adding sequences only once it holds more than n_ubatch of them.
        while end + 1 < len(left) and left[end + 1] and end - first < n_ubatch:
            end += 1
        n_seqs = end - first + 1
        take = min(min(left[first : end + 1]), max(1, n_ubatch // n_seqs))
        for k in range(first, end + 1):
            left[k] -= take
        count += 1
