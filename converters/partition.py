"""Layer ranges for stages: given by the user, or balanced by the weight bytes each stage reads per token."""

from __future__ import annotations

from collections.abc import Sequence


class PartitionError(ValueError):
    pass


def parse_layers(spec: str, n_layer: int) -> list[tuple[int, int]]:
    """Parse ``"0:10,10:20,20:30"`` into half-open ranges that must tile ``[0, n_layer)`` exactly."""
    ranges = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition(":")
        if not sep:
            raise PartitionError(f"--layers: {part!r} is not START:END")
        try:
            ranges.append((int(lo), int(hi)))
        except ValueError:
            raise PartitionError(f"--layers: {part!r} is not START:END with whole numbers") from None
    check_ranges(ranges, n_layer)
    return ranges


def check_ranges(ranges: Sequence[tuple[int, int]], n_layer: int) -> None:
    expected = 0
    for lo, hi in ranges:
        if lo != expected:
            kind = "gap" if lo > expected else "overlap"
            raise PartitionError(
                f"--layers: {kind} at layer {min(lo, expected)} (range {lo}:{hi} follows end {expected})"
            )
        if hi <= lo:
            raise PartitionError(f"--layers: empty or reversed range {lo}:{hi}")
        expected = hi
    if expected != n_layer:
        raise PartitionError(f"--layers: ranges end at {expected} but the model has {n_layer} layers")


def balance(
    layer_bytes: Sequence[int], n_stages: int, first_extra: int = 0, last_extra: int = 0
) -> list[tuple[int, int]]:
    """Split layers into ``n_stages`` contiguous ranges minimising the heaviest stage's bytes.

    The first stage also carries ``first_extra`` bytes (token embedding), the last ``last_extra`` (head).
    Exact dynamic programme over split points: O(n_stages x n_layer^2), trivial for real layer counts.
    """
    n = len(layer_bytes)
    if not 1 <= n_stages <= n:
        raise PartitionError(f"cannot split {n} layers into {n_stages} stages (need 1 <= stages <= {n})")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def cost(k: int, lo: int, hi: int) -> int:
        c = prefix[hi] - prefix[lo]
        if k == 0:
            c += first_extra
        if k == n_stages - 1:
            c += last_extra
        return c

    inf = float("inf")
    # best[k][j]: minimal max-cost splitting layers [0, j) into stages 0..k
    best = [[inf] * (n + 1) for _ in range(n_stages)]
    cut = [[0] * (n + 1) for _ in range(n_stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j)
    for k in range(1, n_stages):
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                c = max(best[k - 1][i], cost(k, i, j))
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    ranges = []
    j = n
    for k in range(n_stages - 1, 0, -1):
        i = cut[k][j]
        ranges.append((i, j))
        j = i
    ranges.append((0, j))
    return ranges[::-1]
