"""From a model shape and a hosts file to a ``Plan``: layer ranges, replicas, memory and predicted times."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from chatloop.plan.hosts import (
    GIB,
    MIB,
    HostsFile,
    decode_bytes_per_ms,
    head_bytes_per_ms,
    last_step_overhead_ms,
    step_overhead_ms,
)
from chatloop.plan.model_shape import ModelShape
from chatloop.plan.quant_sizes import QUANTS_BY_SIZE
from chatloop.plan.solver import (
    HostCap,
    NoFit,
    Problem,
    Solution,
    add_replicas,
    host_time,
    missing_memory,
    solve,
    stage_memory,
)

log = logging.getLogger(__name__)

PLAN_FORMAT = 1


class PlanError(ValueError):
    """A plan that cannot be made (the model does not fit, a bad plan file); the message says why."""


@dataclass(frozen=True)
class Process:
    host: str  # host name from hosts.yaml
    address: str  # where the coordinator reaches it
    port: int  # the stage process's port
    stage: int  # stage index
    replica: int  # replica number within the stage
    spare: bool  # an extra replica of the bottleneck stage in a host's spare memory (not in the prediction)
    threads: int  # llama.cpp threads
    cpu_cores: str | None  # cores to pin to
    numa_node: int | None  # NUMA node to bind to
    memory_mb: float  # weights + KV + overhead of this process, MiB
    ms_per_token: float  # this replica's time per token alone

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"


@dataclass(frozen=True)
class PlannedStage:
    index: int
    start: int  # first layer (inclusive)
    end: int  # end of the range (exclusive)
    weights_mb: float  # weights held by one replica, MiB
    kv_mb: float  # KV cache of one replica for context_tokens x sequences, MiB
    ms_per_token: float  # the stage's time per token with its (non-spare) replicas sharing the work
    processes: tuple[Process, ...]


@dataclass(frozen=True)
class Plan:
    model: str  # model name
    arch: str
    source: str  # what chatloop convert reads ("" when the planned MODEL cannot be converted)
    quant: str
    n_layer: int
    context_tokens: int
    sequences: int
    chain_ms: float  # slowest stage's time per token in the chain (one host a stage): the optimum found
    bottleneck_ms: float  # the same with dedicated replicas sharing their stage's load: 1000/this tokens/s at most
    stages: tuple[PlannedStage, ...]
    unused_hosts: tuple[str, ...]  # hosts that could hold nothing useful
    coordinator_host: str
    coordinator_address: str
    coordinator_port: int
    model_path: str  # folder of the converted model on every host
    notes: tuple[str, ...] = ()
    format: int = PLAN_FORMAT

    @property
    def layers_arg(self) -> str:
        return ",".join(f"{s.start}:{s.end}" for s in self.stages)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def build_problem(shape: ModelShape, hosts: HostsFile) -> Problem:
    kv_layer = shape.kv_bytes_per_token_layer * hosts.context_tokens * hosts.sequences
    norm_and_head = shape.head_bytes - (shape.embedding_bytes if shape.tied else 0)
    return Problem(
        layer_time=shape.layer_bytes,
        layer_mem=tuple(b + kv_layer for b in shape.layer_bytes),
        hosts=tuple(
            HostCap(
                memory_bytes=int(h.memory_gb * GIB),
                bytes_per_ms=decode_bytes_per_ms(h),
                step_ms=step_overhead_ms(h, hosts.step_overhead_ms),
                last_step_ms=last_step_overhead_ms(h, hosts.step_overhead_ms),
                head_bytes_per_ms=head_bytes_per_ms(h),
            )
            for h in hosts.hosts
        ),
        first_mem=shape.embedding_bytes,
        last_mem=shape.head_bytes,
        # NOTE: a tied model's one stage holds the embedding once, serving as head too.
        both_mem=shape.embedding_bytes + norm_and_head,
        last_time=shape.head_bytes,
        process_mem=hosts.overhead_mb * MIB,
    )


def make_plan(shape: ModelShape, hosts: HostsFile, shape_at: Callable[[str], ModelShape] | None = None) -> Plan:
    """Plan ``shape`` on ``hosts``; ``shape_at(quant)`` (optional) lets a failure name a quantization that fits."""
    problem = build_problem(shape, hosts)
    try:
        chain = solve(problem)
    except NoFit:
        raise PlanError(_no_fit_message(shape, hosts, problem, shape_at)) from None
    return _to_plan(shape, hosts, problem, chain, add_replicas(problem, chain))


def _no_fit_message(
    shape: ModelShape, hosts: HostsFile, problem: Problem, shape_at: Callable[[str], ModelShape] | None
) -> str:
    short = missing_memory(problem)
    total = sum(h.memory_gb for h in hosts.hosts)
    need = (sum(problem.layer_mem) - sum(shape.layer_bytes) + shape.weight_bytes) / GIB  # weights + KV
    msg = (
        f"{shape.name} at {shape.quant} does not fit: its weights and KV cache for {hosts.context_tokens} tokens x "
        f"{hosts.sequences} sequences take {need:.1f} GiB (plus {hosts.overhead_mb} MiB per stage process) and the "
        f"hosts offer {total:.1f} GiB; each host would need {short / GIB:.2f} GiB more "
        f"({short * len(hosts.hosts) / GIB:.1f} GiB in all)"
    )
    if shape_at is not None:
        for q in QUANTS_BY_SIZE:
            try:
                other = shape_at(q)
            except ValueError:
                continue
            if other.weight_bytes >= shape.weight_bytes:
                continue
            try:
                solve(build_problem(other, hosts))
            except NoFit:
                continue
            return f"{msg}. It fits at --quant {q} ({other.weight_bytes / GIB:.1f} GiB of weights)"
        msg += ". No quantization ChatLoop offers makes it fit"
    return msg + "; lower context_tokens or sequences, or add hosts"


def _to_plan(shape: ModelShape, hosts: HostsFile, problem: Problem, chain: Solution, solution: Solution) -> Plan:
    used = {h for s in solution.stages for h in s.hosts}
    kv_layer = shape.kv_bytes_per_token_layer * hosts.context_tokens * hosts.sequences
    per_host: dict[int, list[tuple[int, bool]]] = {}  # host -> [(stage index, spare)]
    for k, s in enumerate(solution.stages):
        for h in s.hosts:
            per_host.setdefault(h, []).append((k, False))
    # Spare memory on a host that already serves a stage becomes an extra replica of the bottleneck stage when
    # the host's own stage leaves it idle at least half the time (its stage takes at most half the bottleneck):
    # failover capacity where it matters most, and work for idle cores. It shares its host's cores with that
    # host's own stage, so the prediction does not count it (the bound stays conservative); on a host busy with
    # its own stage it would only compete for cores, since the coordinator routes to the least loaded replica.
    b = max(range(len(solution.stages)), key=lambda k: solution.stages[k].ms)
    bs = solution.stages[b]
    need_b = stage_memory(problem, bs.start, bs.end)
    notes = []
    for h, host in enumerate(hosts.hosts):
        own = per_host.get(h, [])
        if not own or h in bs.hosts:
            continue
        k = own[0][0]
        held = stage_memory(problem, solution.stages[k].start, solution.stages[k].end)
        idle = host_time(problem, h, solution.stages[k].start, solution.stages[k].end) <= solution.bottleneck_ms / 2
        if idle and held + need_b <= problem.hosts[h].memory_bytes:
            own.append((b, True))
            notes.append(f"{host.name}: spare memory and idle cores hold an extra replica of the bottleneck stage {b}")
    stages = []
    for k, s in enumerate(solution.stages):
        weights = sum(shape.layer_bytes[s.start : s.end])
        weights += (shape.embedding_bytes if s.start == 0 else 0) + (shape.head_bytes if s.end == shape.n_layer else 0)
        if s.start == 0 and s.end == shape.n_layer and shape.tied:
            weights -= shape.embedding_bytes
        procs = []
        for h, host in enumerate(hosts.hosts):
            for slot, (stage, spare) in enumerate(per_host.get(h, [])):
                if stage != k:
                    continue
                numa = host.numa_nodes[slot % len(host.numa_nodes)] if host.numa_nodes else None
                procs.append(
                    Process(
                        host=host.name,
                        address=host.address,
                        port=host.port + slot,
                        stage=k,
                        replica=0,
                        spare=spare,
                        threads=host.cores,
                        cpu_cores=host.cpu_cores,
                        numa_node=numa,
                        memory_mb=stage_memory(problem, s.start, s.end) / MIB,
                        ms_per_token=host_time(problem, h, s.start, s.end),
                    )
                )
        procs.sort(key=lambda p: p.spare)  # the replicas the prediction counts first
        procs = [Process(**{**asdict(p), "replica": r}) for r, p in enumerate(procs)]
        stages.append(
            PlannedStage(
                index=k,
                start=s.start,
                end=s.end,
                weights_mb=weights / MIB,
                kv_mb=kv_layer * (s.end - s.start) / MIB,
                ms_per_token=s.ms,
                processes=tuple(procs),
            )
        )
    if any(h.speed is None for h in hosts.hosts):
        measured = [h.name for h in hosts.hosts if h.speed is not None]
        notes.append(
            "speeds estimated from cores for hosts without a measured speed"
            + (f" (measured: {', '.join(measured)}); mixing both makes the split less reliable" if measured else "")
            + ": run chatloop bench-host on each host for a better plan"
        )
    if not shape.source:
        notes.append("the planned MODEL is not a convertible source: run chatloop convert on the original model")
    coord = next((h for h in hosts.hosts if h.name == hosts.coordinator_host), hosts.hosts[0])
    return Plan(
        model=shape.name,
        arch=shape.arch,
        source=shape.source,
        quant=shape.quant,
        n_layer=shape.n_layer,
        context_tokens=hosts.context_tokens,
        sequences=hosts.sequences,
        chain_ms=chain.bottleneck_ms,
        bottleneck_ms=solution.bottleneck_ms,
        stages=tuple(stages),
        unused_hosts=tuple(h.name for i, h in enumerate(hosts.hosts) if i not in used and i not in per_host),
        coordinator_host=coord.name,
        coordinator_address=coord.address,
        coordinator_port=hosts.coordinator_port,
        model_path=hosts.model_path,
        notes=tuple(notes),
    )


def load_plan(path) -> Plan:
    """Read a ``plan.json`` written by ``chatloop plan``; ``PlanError`` names what is wrong."""
    import pathlib  # noqa: PLC0415

    path = pathlib.Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: not a readable plan ({exc})") from None
    try:
        if raw.get("format") != PLAN_FORMAT:
            raise PlanError(f"{path}: plan format {raw.get('format')!r}, expected {PLAN_FORMAT}")
        stages = tuple(
            PlannedStage(**{**s, "processes": tuple(Process(**p) for p in s["processes"])}) for s in raw["stages"]
        )
        plan = Plan(
            **{**raw, "stages": stages, "unused_hosts": tuple(raw["unused_hosts"]), "notes": tuple(raw["notes"])}
        )
    except PlanError:
        raise
    except (KeyError, TypeError, AttributeError) as exc:
        raise PlanError(f"{path}: missing or unexpected field ({exc})") from None
    expected = 0
    for s in plan.stages:
        if s.start != expected or s.end <= s.start or not math.isfinite(s.ms_per_token):
            raise PlanError(f"{path}: stage {s.index} has a bad layer range {s.start}:{s.end}")
        expected = s.end
    if not plan.stages or expected != plan.n_layer:
        raise PlanError(f"{path}: the stages do not cover the model's {plan.n_layer} layers")
    return plan
