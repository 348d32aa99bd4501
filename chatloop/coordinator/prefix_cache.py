"""The prefix cache: finished sequences whose KV stays in the stages, indexed by token blocks.

When a sequence finishes, its KV stays in every stage of its route (instead of being released) as a cache
entry, as long as the stages have a free sequence slot for it and the cache stays within its token bound. A new
request whose prompt starts with an entry's tokens has every stage of that route copy the entry's KV into the
new sequence (``SeqStep.prefix_from``) and prefills only the rest (docs/design.md, "Prefix cache").

The index hashes the tokens in blocks of ``BLOCK`` (each block's hash covers everything before it, as vLLM's
block hashes do), so finding the longest cached prefix of a prompt walks its blocks once. Entries are evicted
least recently used first; an entry being copied from (``pins`` > 0) is never evicted. A replica that fails or
restarts takes its entries with it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from chatloop.coordinator.cluster import Replica
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.protocol.messages import BLOCK_ROWS

log = logging.getLogger(__name__)

# Tokens per hashed block, and the unit of reuse: a cached prefix is reused in whole blocks of the prompt (the
# positions every stage computed in 64-row blocks, see engine/runtime.py plan_decodes), so a sequence that reuses
# one computes every position exactly as it would without the cache.
BLOCK = BLOCK_ROWS


def block_hashes(tokens: list[int], n_blocks: int | None = None) -> list[bytes]:
    """Chained hashes of the first ``n_blocks`` full blocks of ``tokens`` (all full blocks by default)."""
    full = len(tokens) // BLOCK
    n = full if n_blocks is None else min(n_blocks, full)
    out = []
    h = b""
    for b in range(n):
        block = tokens[b * BLOCK : (b + 1) * BLOCK]
        h = hashlib.blake2b(h + b"".join(t.to_bytes(4, "little") for t in block), digest_size=16).digest()
        out.append(h)
    return out


@dataclass(eq=False)
class CacheEntry:
    seq_id: int  # the finished sequence whose KV the stages keep
    tokens: list[int]  # what that KV holds, position by position
    reusable: int  # leading positions computed in whole blocks (its prompt's): the most a new sequence may take
    route: list[Replica]  # the replica of every stage holding it
    hashes: list[bytes] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    pins: int = 0  # requests copying from it right now

    def common_prefix(self, tokens: list[int], limit: int) -> int:
        """How many leading tokens of ``tokens`` (at most ``limit``) this entry holds."""
        n = min(len(self.tokens), len(tokens), limit)
        i = 0
        while i < n and self.tokens[i] == tokens[i]:
            i += 1
        return i


@dataclass(frozen=True)
class PrefixHit:
    entry: CacheEntry
    length: int  # tokens the new sequence takes from the entry


class PrefixCache:
    def __init__(
        self,
        metrics: CoordinatorMetrics,
        max_tokens: int,
        slots_free: Callable[[Replica], int],
        release: Callable[[Replica, int], None],
        exact: bool = True,
    ) -> None:
        """``max_tokens``: bound on the tokens all entries hold (0 = only stage slots bound it);
        ``slots_free(replica)``: sequence slots a replica has left; ``release(replica, seq_id)``: free KV there;
        ``exact``: reuse only whole blocks of prompts (bit-exact with no cache), else every cached position."""
        self.metrics = metrics
        self.max_tokens = max_tokens
        self.exact = exact
        self._slots_free = slots_free
        self._release = release
        self.entries: dict[int, CacheEntry] = {}  # by seq_id
        self._by_hash: dict[bytes, set[CacheEntry]] = {}
        self.tokens = 0

    # -- lookup ----------------------------------------------------------------------------------------

    def lookup(
        self, prompt: list[int], usable: Callable[[CacheEntry], bool], block_end: int | None = None
    ) -> PrefixHit | None:
        """The entry holding the longest prefix of ``prompt`` among those ``usable`` says yes to, in whole blocks,
        within the entry's reusable part and the new sequence's ``block_end`` (default: the prompt's whole
        blocks); not ``exact``: any length within the entry's cached tokens. At least one token of the prompt is
        always left to compute (the last stage needs its logits)."""
        if block_end is None or not self.exact:
            block_end = len(prompt) // BLOCK * BLOCK if self.exact else len(prompt)
        limit = min(len(prompt) - 1, block_end)
        best: PrefixHit | None = None
        candidates: set[CacheEntry] = set()  # every entry sharing at least one whole leading block
        for h in block_hashes(prompt, limit // BLOCK):
            found = self._by_hash.get(h)
            if not found:
                break
            candidates |= found
        for entry in candidates:
            if not usable(entry):
                continue
            n = entry.common_prefix(prompt, min(limit, entry.reusable))
            n = n // BLOCK * BLOCK if self.exact else n
            if n >= BLOCK and (best is None or n > best.length):
                best = PrefixHit(entry, n)
        return best

    def pin(self, hit: PrefixHit) -> None:
        hit.entry.pins += 1
        hit.entry.last_used = time.monotonic()
        self.metrics.prefix_hits.inc()
        self.metrics.prefix_hit_tokens.inc(hit.length)

    def unpin(self, entry: CacheEntry) -> None:
        entry.pins = max(0, entry.pins - 1)

    # -- entries ---------------------------------------------------------------------------------------

    def add(self, seq_id: int, tokens: list[int], route: list[Replica], reusable: int | None = None) -> bool:
        """Keep a finished sequence's KV as an entry (``reusable``: its leading positions computed in whole
        blocks, default all whole blocks); False when there is no room (the caller releases it)."""
        reusable = min(len(tokens), len(tokens) // BLOCK * BLOCK if reusable is None else reusable)
        if reusable < BLOCK or (self.max_tokens and len(tokens) > self.max_tokens):
            return False
        while self.max_tokens and self.tokens + len(tokens) > self.max_tokens:
            if not self._evict_one(lambda e: True):
                return False
        entry = CacheEntry(seq_id, list(tokens), reusable, list(route), block_hashes(tokens, reusable // BLOCK))
        self.entries[seq_id] = entry
        for h in entry.hashes:
            self._by_hash.setdefault(h, set()).add(entry)
        for r in route:
            r.cached += 1
        self.tokens += len(tokens)
        self._gauges()
        return True

    def make_room(self, replica: Replica) -> bool:
        """Evict entries on ``replica`` until it has a free sequence slot; False when pinned entries fill it."""
        while self._slots_free(replica) <= 0:
            if not self._evict_one(lambda e: replica in e.route):
                return False
        return True

    def evict_tokens(self, needed: int) -> int:
        """Evict least recently used entries until ``needed`` tokens are freed (or nothing is left); returns
        the tokens freed."""
        freed = 0
        while freed < needed:
            before = self.tokens
            if not self._evict_one(lambda e: True):
                break
            freed += before - self.tokens
        return freed

    def forget_replica(self, replica: Replica, why: str) -> None:
        """The replica failed or restarted: its entries are gone (nothing to release)."""
        lost = [e for e in self.entries.values() if replica in e.route]
        for e in lost:
            self._drop(e, release_at=[r for r in e.route if r is not replica])
        if lost:
            log.info("prefix cache: forgot %d entries on %s (%s)", len(lost), replica.name, why)

    def forget(self, entry: CacheEntry) -> None:
        """An entry turned out to be gone at a stage (e.g. reaped as idle): never use it again."""
        if entry.seq_id in self.entries:
            self._drop(entry, release_at=entry.route)

    def clear(self) -> None:
        for e in list(self.entries.values()):
            self._drop(e, release_at=e.route)

    def replicas_tokens(self) -> dict[Replica, int]:
        out: dict[Replica, int] = {}
        for e in self.entries.values():
            for r in e.route:
                out[r] = out.get(r, 0) + len(e.tokens)
        return out

    def _evict_one(self, eligible: Callable[[CacheEntry], bool]) -> bool:
        victims = [e for e in self.entries.values() if e.pins == 0 and eligible(e)]
        if not victims:
            return False
        victim = min(victims, key=lambda e: e.last_used)
        self._drop(victim, release_at=victim.route)
        self.metrics.prefix_evictions.inc()
        return True

    def _drop(self, entry: CacheEntry, release_at: Iterable[Replica]) -> None:
        self.entries.pop(entry.seq_id, None)
        for h in entry.hashes:
            group = self._by_hash.get(h)
            if group is not None:
                group.discard(entry)
                if not group:
                    del self._by_hash[h]
        for r in entry.route:
            r.cached -= 1
        for r in release_at:
            self._release(r, entry.seq_id)
        self.tokens -= len(entry.tokens)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.prefix_cached_tokens.set(self.tokens)
        self.metrics.prefix_entries.set(len(self.entries))
