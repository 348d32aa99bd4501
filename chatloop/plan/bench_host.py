"""``chatloop bench-host``: how fast this machine decodes, as a ``hosts.yaml`` entry for ``chatloop plan``.

Two middle-stage files are cut from the model (layers ``[1, 1+k)`` and ``[1, 2)``), or written synthetic,
and each is decoded at 1 row and at 8 rows (8 sequences of one row) at this machine's thread count. The
difference of the two times is ``k - 1`` layers of work, so per-layer time and the fixed cost of a decode call
(graph, callback, thread wake-up) come apart: the planner needs both.

With a model, a last-stage file (its last layer, output norm and head) is timed beside them and samples as a
served last stage does: its time less the one-layer file's is the head's. The head is one wide matrix, often of
another type than the layers (Q8_0 or Q6_K beside Q4 layers), and its kernel's speed per byte differs from the
layers' (on a compute-bound CPU by several times), so the planner prices it by its own speed. Then that file is
served by a real stage process, and so is the one-layer middle file: what a served step keeps each busy beyond its
decode (its event loop's work, frames in and out, the hand-offs to the decode thread and back: ``served_step.py``)
joins the fixed cost of a step of its role, the last stage replying to the coordinator, a first or middle stage
passing hidden states on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

_ROWS = (1, 8)


@dataclass(frozen=True)
class DecodeTiming:
    rows: int  # rows (sequences) per decode
    ms_per_layer: float  # median time of one layer per decode
    step_ms: float  # fixed cost of a decode call
    head_ms: float | None = None  # median time of the output norm, head and sampling per decode; None = not timed
    # what a served last-stage step keeps the stage busy beyond its decode (event loop, thread hand-offs), ms
    serve_ms: float = 0.0  # (0: not measured)
    pass_ms: float = 0.0  # the same for a middle stage, which passes its hidden states on (0: not measured)

    @property
    def step_overhead_ms(self) -> float:
        """The fixed cost of a served step of a first or middle stage, whatever its layers (hosts.yaml
        ``step_overhead_ms``)."""
        return self.step_ms + self.pass_ms

    @property
    def last_step_overhead_ms(self) -> float:
        """The same for the last stage (hosts.yaml ``last_step_overhead_ms``)."""
        return self.step_ms + self.serve_ms


@dataclass(frozen=True)
class HostBench:
    workload: str  # what was timed
    layer_bytes: float  # weight bytes of one timed layer
    threads: int
    timings: tuple[DecodeTiming, ...]
    memory_gb_s: float
    cpu_quota: float | None = None  # cores the cgroup CPU quota allows (timings are scaled to it), None = no quota
    head_bytes: float = 0.0  # weight bytes of the timed output norm and head (0: no head timed)
    served: bool = False  # served steps were timed (DecodeTiming.serve_ms and pass_ms)

    def decode_gb_s(self, rows: int) -> float:
        t = next(t for t in self.timings if t.rows == rows)
        return self.layer_bytes / (t.ms_per_layer * 1e6)

    def head_gb_s(self, rows: int) -> float | None:
        t = next(t for t in self.timings if t.rows == rows)
        return None if t.head_ms is None or not self.head_bytes else self.head_bytes / (t.head_ms * 1e6)


@dataclass(frozen=True)
class Workload:
    many: pathlib.Path  # a middle-stage file of k layers
    one: pathlib.Path  # the same with 1 layer
    k: int  # layers in ``many``
    layer_bytes: float  # weight bytes of one layer
    what: str  # description for the output
    last: pathlib.Path | None = None  # a last stage of one layer (the model's last) with output norm and head
    head_bytes: float = 0.0  # weight bytes of that output norm and head


def _paired_decode_ms(w: Workload, threads: int, rows: int, steps: int) -> tuple[float, float, float | None, float]:
    """Median ms of one layer, of the rest of a decode call and of the head (None without ``w.last``), from the
    files decoded in turn; and the share of its threads' time the decodes got (CPU time / wall time x threads:
    below 1 when other work shares the cores).

    NOTE: the files alternate step by step and each figure is the median of paired differences, so load from
    other processes that comes and goes falls on both sides of each difference alike.
    """
    from chatloop.engine.runtime import RuntimeOptions, SeqStep, StageRole, StageRuntime  # noqa: PLC0415
    from chatloop.engine.worker_thread import WorkerThread  # noqa: PLC0415

    opts = RuntimeOptions(n_threads=threads, kv_cache_mb=64, max_sequences=8)
    middle = StageRole(first=False, last=False)
    # One decode thread for every runtime: llama.cpp's OpenMP team belongs to the calling thread (runtime.py).
    with WorkerThread("bench-host-decode") as pool, contextlib.ExitStack() as stack:
        many = stack.enter_context(StageRuntime(w.many, middle, opts, pool))
        one = stack.enter_context(StageRuntime(w.one, middle, opts, pool))
        runtimes = [many, one]
        if w.last is not None:
            runtimes.append(stack.enter_context(StageRuntime(w.last, StageRole(first=False, last=True), opts, pool)))
        rng = np.random.default_rng(0)
        diffs, ones, heads, cpu, wall = [], [], [], 0.0, 0.0
        for i in range(steps + 3):  # the first decodes warm caches and page the weights in
            data = rng.standard_normal((rows, many.n_embd), dtype=np.float32)
            t = []
            for rt in runtimes:
                # the last stage samples (greedy, as a served step does); the others only compute
                batch = [SeqStep(seq_id=s, pos=i, n_tokens=1, sample=rt.role.last) for s in range(rows)]
                t0, c0 = time.perf_counter(), time.process_time()
                rt.run(rt.forward, batch, data)
                t.append(time.perf_counter() - t0)
                if i >= 3:
                    cpu, wall = cpu + time.process_time() - c0, wall + t[-1]
            if i >= 3:
                diffs.append((t[0] - t[1]) * 1e3)
                ones.append(t[1] * 1e3)
                if len(t) == 3:
                    heads.append((t[2] - t[1]) * 1e3)
    per_layer = max(statistics.median(diffs) / (w.k - 1), 1e-6)
    head = max(statistics.median(heads), 1e-6) if heads else None
    share = min(max(cpu / max(wall * threads, 1e-9), 0.05), 1.0)
    return per_layer, max(statistics.median(ones) - per_layer, 0.0), head, share


def _slice_files(model: pathlib.Path, work: pathlib.Path, k: int) -> Workload:
    """Layers 1:1+k and 1:2 of ``model`` as middle-stage files and its last layer as a last stage, cut by
    ``chatloop convert`` in a child process (the serving package never imports the conversion package)."""
    from chatloop.modelfiles.gguf_info import read_gguf_info  # noqa: PLC0415
    from chatloop.plan.model_shape import from_gguf  # noqa: PLC0415

    info = read_gguf_info(model)
    n = info.n_layer
    if n < 4:
        raise ValueError(f"{model}: {n} layers; timing needs at least 4 (or omit --model)")
    # NOTE: the timed layers must not fit in the last-level cache, or they are read from it instead of memory, as
    # a served stage's are not (the demo's 2.2 MB layers: 0.38 ms a layer timed 6 at a time, 0.48 timed 20 at a
    # time, with a 32 MiB L3). The many-layer file stays a middle stage (it ends before the last layer).
    mean_layer = sum(info.layer_bytes[1 : n - 1]) / (n - 2)
    k = max(k, math.ceil(2 * last_level_cache_bytes() / max(mean_layer, 1.0)))
    k = max(2, min(k, n - 2))
    # The one-layer cut also yields the last stage: [..., n-1:n] holds the last layer, the output norm and head.
    cuts = {
        "many": ["0:1", f"1:{1 + k}"] + ([f"{1 + k}:{n}"] if 1 + k < n else []),
        "one": ["0:1", "1:2"] + ([f"2:{n - 1}"] if n - 1 > 2 else []) + [f"{n - 1}:{n}"],
    }
    for name, layers in cuts.items():
        cmd = [sys.executable, "-m", "chatloop.cli", "convert", str(model), "--layers", ",".join(layers)]
        subprocess.run([*cmd, "--out", str(work / name)], check=True, stdout=subprocess.DEVNULL)
    per_layer = sum(info.layer_bytes[1 : 1 + k]) / k
    many = work / "many" / "stage-1.gguf"
    return Workload(
        many=many,
        one=work / "one" / "stage-1.gguf",
        k=from_gguf(many).n_layer,
        layer_bytes=per_layer,
        what=f"layers 1:{1 + k} of {model.name} ({per_layer / 1e6:.1f} MB a layer)",
        last=work / "one" / f"stage-{len(cuts['one']) - 1}.gguf",
        head_bytes=float(from_gguf(model).head_bytes),
    )


def last_level_cache_bytes(cpu: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Size of this CPU's last-level cache in bytes (sysfs), 0 when it cannot be read."""
    best = (0, 0)  # (level, bytes)
    for d in pathlib.Path(cpu).glob("index[0-9]*"):
        try:
            level = int((d / "level").read_text())
            text = (d / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        unit = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, (level, int(digits) * unit))
    return best[1]


def _synthetic_pair(work: pathlib.Path, k: int) -> tuple[pathlib.Path, pathlib.Path, float, str]:
    from chatloop.plan.model_shape import from_gguf  # noqa: PLC0415
    from chatloop.plan.synthetic import write_synthetic_stage  # noqa: PLC0415

    many = write_synthetic_stage(work / f"synthetic-{k}.gguf", k)
    one = write_synthetic_stage(work / "synthetic-1.gguf", 1)
    per_layer = sum(from_gguf(many).layer_bytes) / k
    return many, one, per_layer, f"synthetic 1B-class Q8_0 layer ({per_layer / 1e6:.1f} MB)"


def memory_read_gb_s(threads: int, mb: int = 256, repeats: int = 5) -> float:
    """Best of ``repeats`` parallel sums over an ``mb`` MiB array: the memory read bandwidth numpy reaches."""
    a = np.ones(mb * 1024 * 1024 // 8, dtype=np.float64)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL inside the sums
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def prepare(model: pathlib.Path | None, work: pathlib.Path, layers: int = 6) -> Workload:
    """Cut (or write) the timing files into ``work``."""
    from chatloop.plan.model_shape import from_gguf  # noqa: PLC0415

    if model is not None:
        return _slice_files(model, work, layers)
    many, one, layer_bytes, what = _synthetic_pair(work, min(layers, 3))
    return Workload(many, one, from_gguf(many).n_layer, layer_bytes, what)


def measure(
    w: Workload,
    threads: int,
    steps: int = 40,
    rows_list: tuple[int, ...] = _ROWS,
    bandwidth: bool = True,
    served: bool = True,
) -> HostBench:
    """Time ``w`` at each of ``rows_list`` rows per decode; ``served``: also served steps of a middle and a last
    stage (needs ``w.last``), ``bandwidth``: also numpy's memory read bandwidth."""
    # NOTE: a CPU quota (a container's CPU limit) throttles in whole periods (100 ms by default): a single decode,
    # and so the median of many, runs at full speed, but sustained decoding gets quota / threads of each thread's
    # time. The timings are stretched to that.
    from chatloop.plan.served_step import ServedStep, ServedStepError, served_step  # noqa: PLC0415

    quota = cpu_quota_cores()
    stretch = threads / quota if quota is not None and quota < threads else 1.0
    served_steps: dict[str, ServedStep] = {}  # a served one-row step by role
    if served and w.last is not None:
        for role, file in (("last", w.last), ("middle", w.one)):
            try:
                served_steps[role] = served_step(file, threads, steps)
            except ServedStepError as exc:
                log.warning(
                    "a served %s-stage step could not be timed (its overhead is the decode call's): %s", role, exc
                )
    paired = {rows: _paired_decode_ms(w, threads, rows, steps) for rows in rows_list}
    # NOTE: what a served step costs beyond the decode call is the served step's busy time less the decode of its
    # file's layers (and head) timed here at one row: the event loop's work, and the hand-offs between threads,
    # which on a core shared with other work wait for the scheduler. Served steps are one-row; 8-row decodes get
    # the same.
    extra: dict[str, float] = {}
    if 1 in paired:
        per_layer, step, head, _ = paired[1]
        for role, ss in served_steps.items():
            decode = per_layer + step + (head or 0.0) * (role == "last")
            # NOTE: under a CPU quota the served steps, back to back, were throttled as sustained decoding is:
            # their busy time is in this host's time already, the decode's is once stretched.
            extra[role] = max(ss.busy_ms - decode * stretch, 0.0)
            log.info(
                "%s-stage served step: busy %.3f ms (forward %.3f, event loop %.3f ms CPU) against a decode of %.3f "
                "ms: %.3f ms more",
                *(role, ss.busy_ms, ss.forward_ms, ss.loop_cpu_ms, decode, extra[role]),
            )
    timings = []
    for rows, (per_layer, step, head, share) in paired.items():
        timings.append(
            DecodeTiming(
                rows,
                per_layer * stretch,
                step * stretch,
                None if head is None else head * stretch,
                serve_ms=extra.get("last", 0.0),
                pass_ms=extra.get("middle", 0.0),
            )
        )
        log.info(
            "%d thread(s), %d row(s): %.3f ms a layer + %.3f ms a call (share of the cores %.2f)",
            *(threads, rows, per_layer, step, share),
        )
        if head is not None:
            log.info("%d thread(s), %d row(s): %.3f ms the head", threads, rows, head)
    if stretch > 1.0:
        log.info("CPU quota of %.2f cores for %d thread(s): timings x %.2f", quota, threads, stretch)
    gb_s = memory_read_gb_s(threads) if bandwidth else 0.0
    return HostBench(
        w.what, w.layer_bytes, threads, tuple(timings), gb_s, quota, w.head_bytes, served=len(served_steps) == 2
    )


def cpu_quota_cores(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """Cores this process's cgroup CPU quota allows (the smallest on its path up to the root; cgroup v2 ``cpu.max``
    or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), or None without a quota or when it cannot be read."""
    try:
        lines = pathlib.Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    base = pathlib.Path(root)
    found: list[float] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = pathlib.PurePosixPath(path or "/").relative_to("/")
        v1 = "cpu" in controllers.split(",")
        if not v1 and controllers:
            continue
        dirs = [base / "cpu", base / "cpu,cpuacct"] if v1 else [base]
        for top in dirs:
            for part in [rel, *rel.parents]:  # the cgroup, then its parents (a pod's limit holds its containers)
                q = _read_quota(top / part, v1)
                if q is not None:
                    found.append(q)
    return min(found) if found else None


def _read_quota(d: pathlib.Path, v1: bool) -> float | None:
    try:
        if v1:
            quota = int((d / "cpu.cfs_quota_us").read_text())
            period = int((d / "cpu.cfs_period_us").read_text())
            return quota / period if quota > 0 and period > 0 else None
        limit, period = (d / "cpu.max").read_text().split()[:2]
        return int(limit) / int(period) if limit != "max" and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def bench(model: pathlib.Path | None, threads: int, layers: int = 6, steps: int = 40) -> HostBench:
    with tempfile.TemporaryDirectory(prefix="chatloop-bench-host-") as tmp:
        return measure(prepare(model, pathlib.Path(tmp), layers), threads, steps)


def available_memory_gb() -> float:
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1024**3
    except OSError:
        pass
    return 0.0


def numa_nodes() -> list[int]:
    nodes = sorted(int(p.name[4:]) for p in pathlib.Path("/sys/devices/system/node").glob("node[0-9]*"))
    return nodes if len(nodes) > 1 else []


def host_entry(result: HostBench, name: str, address: str, memory_gb: float) -> str:
    """A ``hosts.yaml`` list entry (YAML text) with the measured speed."""
    one = next(t for t in result.timings if t.rows == 1)
    lines = [
        f"# measured by chatloop bench-host: {result.workload}, {result.threads} threads",
        *(
            [f"# CPU quota of {result.cpu_quota:.2f} cores (cgroup): the timings are those of sustained decoding"]
            if result.cpu_quota is not None and result.cpu_quota < result.threads
            else []
        ),
        *(
            f"#   {t.rows} row(s) per decode: {t.ms_per_layer:.3f} ms a layer + {t.step_ms:.3f} ms a call"
            + (
                f" + {t.pass_ms:.3f} ms more a served step keeps a stage busy ({t.serve_ms:.3f} ms the last stage)"
                if result.served
                else ""
            )
            + (f"; head {t.head_ms:.3f} ms ({result.head_bytes / 1e6:.1f} MB)" if t.head_ms is not None else "")
            for t in result.timings
        ),
        f"- name: {name}",
        f"  address: {address}",
        f"  memory_gb: {memory_gb:.1f}  # available now x 0.9: lower it for what else runs here",
        f"  cores: {result.threads}",
    ]
    nodes = numa_nodes()
    if nodes:
        lines.append(f"  numa_nodes: {nodes}")
    lines += [
        "  speed:",
        f"    decode_gb_s: {result.decode_gb_s(1):.2f}",
        f"    step_overhead_ms: {one.step_overhead_ms:.3f}",
        *([f"    last_step_overhead_ms: {one.last_step_overhead_ms:.3f}"] if result.served else []),
        *([f"    head_gb_s: {result.head_gb_s(1):.2f}"] if result.head_gb_s(1) is not None else []),
        f"    decode_gb_s_8rows: {result.decode_gb_s(8):.2f}",
        f"    memory_gb_s: {result.memory_gb_s:.1f}",
        f"    threads: {result.threads}",
    ]
    return "\n".join(lines)


def default_threads() -> int:
    """The cores this process may use: its CPU affinity, and no more than its cgroup CPU quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    quota = cpu_quota_cores()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def default_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
