"""The placement problem: a chain of hosts with contiguous layer ranges that minimises the slowest stage.

Model (what the planner hands in, all plain numbers):

* a stage is a half-open layer range ``[lo, hi)`` served by one host; every host serves at most one stage;
  stages follow each other in layer order and cover every layer;
* a host serving ``[lo, hi)`` needs ``process + Σ layer_mem[lo:hi]`` bytes, plus ``first_mem`` when it holds
  layer 0, ``last_mem`` when it holds the last layer (``both_mem`` when it holds both: a tied head is stored
  once), and must stay within its memory;
* its time per token is ``step_ms + Σ layer_time[lo:hi] / bytes_per_ms``, plus ``last_time / head_bytes_per_ms``
  when it holds the last layer (one-row decoding streams every weight once; the head, one wide matrix often of
  another type, plus sampling, has its own measured speed per byte), where the last stage's fixed cost is
  ``last_step_ms`` (it replies to the coordinator instead of passing hidden states on);
* the pipeline's throughput is bounded by the slowest stage, whose time ``solve`` minimises exactly.

Exact method: for a bound ``T``, a dynamic programme over subsets of hosts finds the furthest layer any chain
of those hosts can cover with every stage within ``T`` (a host placed at layer ``j`` takes as many layers as it
can: covering further is never worse, because a range that starts later holds a subset of the layers and
neither end's extras). Bisection on ``T`` closes in on the optimum, each feasible step moving the upper end to
the bottleneck actually achieved, so the chain returned is optimal to a relative 1e-9. Cost: 2^n x n per bound.

Then ``add_replicas``: hosts the chain leaves unused become replicas of the slowest stage they can hold
(replicas share a stage's sequences, so a stage's time per token under load becomes ``1 / Σ 1/t_h``). That
second step is greedy, not proven optimal; the tests hold only ``solve`` to brute force.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

MAX_HOSTS = 14  # 2^14 x 14 chain extensions per bound: a few seconds in Python per plan
_REL_TOL = 1e-9


class NoFit(ValueError):
    """No arrangement keeps every host within its memory."""


@dataclass(frozen=True)
class HostCap:
    memory_bytes: int  # what the host's stage process may hold
    bytes_per_ms: float  # weight bytes one-row decoding streams per millisecond
    step_ms: float = 0.0  # fixed cost of one step (decode call and event loop) of a first or middle stage
    head_bytes_per_ms: float | None = None  # the same for the output head (and sampling); None = bytes_per_ms
    last_step_ms: float | None = None  # fixed cost of one step of the last stage; None = step_ms


@dataclass(frozen=True)
class Problem:
    layer_time: tuple[int, ...]  # bytes each layer streams per token (its weights)
    layer_mem: tuple[int, ...]  # bytes each layer holds (weights + KV cache)
    hosts: tuple[HostCap, ...]
    first_mem: int = 0  # extra bytes held with layer 0 (token embedding)
    last_mem: int = 0  # extra bytes held with the last layer (output norm and head)
    both_mem: int | None = None  # extra bytes when one stage holds both ends; None = first_mem + last_mem
    last_time: int = 0  # extra bytes the last stage streams per token (the head)
    process_mem: int = 0  # bytes every stage process needs besides its layers

    @property
    def n_layer(self) -> int:
        return len(self.layer_time)


@dataclass(frozen=True)
class StageChoice:
    start: int  # first layer (inclusive)
    end: int  # end of the range (exclusive)
    hosts: tuple[int, ...]  # indices into Problem.hosts of this stage's replicas (the chain's host first)
    ms: float  # time per token of the stage; with replicas, under load shared between them (1 / Σ 1/t_h)


@dataclass(frozen=True)
class Solution:
    stages: tuple[StageChoice, ...]
    bottleneck_ms: float  # the slowest stage's time per token: the pipeline's throughput bound


class _Prefix:
    def __init__(self, p: Problem) -> None:
        self.p = p
        self.time = [0]
        self.mem = [0]
        for t, m in zip(p.layer_time, p.layer_mem):
            self.time.append(self.time[-1] + t)
            self.mem.append(self.mem[-1] + m)

    def mem_of(self, lo: int, hi: int) -> int:
        p, n = self.p, self.p.n_layer
        m = p.process_mem + self.mem[hi] - self.mem[lo]
        if lo == 0 and hi == n:
            return m + (p.first_mem + p.last_mem if p.both_mem is None else p.both_mem)
        return m + (p.first_mem if lo == 0 else 0) + (p.last_mem if hi == n else 0)

    def host_ms(self, h: int, lo: int, hi: int) -> float:
        host = self.p.hosts[h]
        ms = (self.time[hi] - self.time[lo]) / host.bytes_per_ms
        if hi < self.p.n_layer:
            return host.step_ms + ms
        last_step = host.step_ms if host.last_step_ms is None else host.last_step_ms
        return last_step + ms + self.p.last_time / (host.head_bytes_per_ms or host.bytes_per_ms)

    def group_ms(self, hosts: Sequence[int], lo: int, hi: int) -> float:
        return 1.0 / sum(1.0 / self.host_ms(h, lo, hi) for h in hosts)

    def fits(self, hosts: Sequence[int], lo: int, hi: int) -> bool:
        need = self.mem_of(lo, hi)
        return all(need <= self.p.hosts[h].memory_bytes for h in hosts)


def stage_memory(p: Problem, lo: int, hi: int) -> int:
    """Bytes one process serving ``[lo, hi)`` needs."""
    return _Prefix(p).mem_of(lo, hi)


def host_time(p: Problem, h: int, lo: int, hi: int) -> float:
    """Milliseconds per token host ``h`` takes for ``[lo, hi)``."""
    return _Prefix(p).host_ms(h, lo, hi)


def evaluate(p: Problem, stages: Sequence[tuple[int, int, Sequence[int]]]) -> float | None:
    """Bottleneck ms of an arrangement ``[(lo, hi, hosts), ...]``, or None when it breaks a memory limit."""
    pre = _Prefix(p)
    worst = 0.0
    for lo, hi, hosts in stages:
        if not pre.fits(hosts, lo, hi):
            return None
        worst = max(worst, pre.group_ms(hosts, lo, hi))
    return worst


def _members(mask: int) -> tuple[int, ...]:
    return tuple(i for i in range(mask.bit_length()) if mask >> i & 1)


def feasible(p: Problem, bound: float) -> Solution | None:
    """An arrangement whose every stage takes at most ``bound`` ms per token, or None."""
    pre = _Prefix(p)
    n, n_layer = len(p.hosts), p.n_layer
    cache: dict[tuple[int, int], int] = {}

    def extend(h: int, j: int) -> int:
        """Furthest end host ``h`` starting at layer ``j`` can reach within bound and memory (``j``: none)."""
        key = (h, j)
        if key in cache:
            return cache[key]
        hosts = (h,)

        def ok(e: int) -> bool:
            return pre.fits(hosts, j, e) and pre.group_ms(hosts, j, e) <= bound

        # NOTE: the last stage's fixed cost may be below the others', so reaching the end can be within the bound
        # where an end before it is not: only below the last layer is ok() monotone.
        if j < n_layer and ok(n_layer):
            cache[key] = n_layer
            return n_layer
        best = j
        lo, hi = j + 1, n_layer - 1
        while lo <= hi:  # ok() is true up to some end, then false: find the last true
            mid = (lo + hi) // 2
            if ok(mid):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        cache[key] = best
        return best

    full = (1 << n) - 1
    reach = [0] * (full + 1)
    choice = [(0, 0)] * (full + 1)
    for mask in range(1, full + 1):
        best, pick = -1, (0, 0)
        # Host h placed last, after the best chain of the others. NOTE: later hosts are tried first and only a
        # strictly further reach replaces them, so ties keep the hosts file's order along the chain.
        for h in reversed(_members(mask)):
            rest = mask & ~(1 << h)
            e = extend(h, reach[rest])
            if e > best:
                best, pick = e, (h, rest)
        reach[mask], choice[mask] = best, pick
    if reach[full] < n_layer:
        return None
    stages = []
    mask = full
    while mask:
        h, rest = choice[mask]
        lo, hi = reach[rest], reach[mask]
        if hi > lo:
            stages.append(StageChoice(lo, hi, (h,), pre.host_ms(h, lo, hi)))
        mask = rest
    stages.reverse()
    return Solution(tuple(stages), max(s.ms for s in stages))


def solve(p: Problem) -> Solution:
    """The arrangement with the smallest bottleneck; ``NoFit`` when no arrangement fits in memory."""
    if not p.hosts:
        raise NoFit("no hosts")
    if len(p.hosts) > MAX_HOSTS:
        raise ValueError(f"{len(p.hosts)} hosts: the exact planner handles at most {MAX_HOSTS}")
    if p.n_layer == 0:
        raise ValueError("a model with no layers")
    best = feasible(p, math.inf)
    if best is None:
        raise NoFit("the model does not fit in the hosts' memory")
    lo = 0.0
    while best.bottleneck_ms - lo > _REL_TOL * best.bottleneck_ms:
        mid = (lo + best.bottleneck_ms) / 2
        found = feasible(p, mid)
        if found is None:
            lo = mid
        else:
            best = found
    return best


def add_replicas(p: Problem, chain: Solution) -> Solution:
    """Hosts the chain leaves unused, fastest first, each become a replica of the slowest stage it can hold."""
    pre = _Prefix(p)
    groups = [list(s.hosts) for s in chain.stages]
    used = {h for g in groups for h in g}
    spare = sorted((h for h in range(len(p.hosts)) if h not in used), key=lambda h: (-p.hosts[h].bytes_per_ms, h))
    for h in spare:
        order = sorted(range(len(groups)), key=lambda k: (-pre.group_ms(groups[k], *_range(chain, k)), k))
        for k in order:
            if pre.fits((h,), *_range(chain, k)):
                groups[k].append(h)
                break
    stages = tuple(
        StageChoice(s.start, s.end, tuple(g), pre.group_ms(g, s.start, s.end)) for s, g in zip(chain.stages, groups)
    )
    return Solution(stages, max(s.ms for s in stages))


def _range(sol: Solution, k: int) -> tuple[int, int]:
    return sol.stages[k].start, sol.stages[k].end


def missing_memory(p: Problem) -> int:
    """Smallest number of bytes that, added to every host, makes the model fit (0 when it fits)."""
    if feasible(p, math.inf) is not None:
        return 0

    def with_extra(extra: int) -> Problem:
        hosts = tuple(dataclasses.replace(h, memory_bytes=h.memory_bytes + extra) for h in p.hosts)
        return Problem(**{**p.__dict__, "hosts": hosts})

    lo, hi = 0, max(1, sum(p.layer_mem) + p.first_mem + p.last_mem + p.process_mem)
    while feasible(with_extra(hi), math.inf) is None:
        hi *= 2
    while hi - lo > max(1, hi // 1000):
        mid = (lo + hi) // 2
        if feasible(with_extra(mid), math.inf) is None:
            lo = mid
        else:
            hi = mid
    return hi
