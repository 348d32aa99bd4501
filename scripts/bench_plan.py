"""Does a plan's prediction hold when served? Two "hosts" of unequal speed on this machine.

``--hosts quota`` (the default; needs root): host ``full-core`` has core 0 to itself, host ``half-core`` core 1
held to half its time by a cgroup CPU quota, 1 llama.cpp thread each: two machines, one half as fast. Each host's
speed is measured by ``chatloop bench-host`` run as that host (pinned, under its quota), as a user would on each
machine. ``--hosts busy``: a core each, one of them shared with a busy loop for the whole run (the scheduler gives
each half of that core within milliseconds: a host half as fast whatever its load, where a quota slows only a stage
busy more than half the time). ``--hosts threads``: 1 vs 2 threads, unpinned, speeds measured in this process (the two "hosts" then
share both cores, so neither is a machine of its own and the prediction is looser).

``chatloop plan`` splits the demo model (SmolLM2-135M-Instruct Q4_1) between them from those speeds; the plan is
converted (the ranges and quantization of plan.json) and served from the stage and coordinator configs the planner
wrote (the stages pin themselves to the plan's ``cpu_cores``; a host's quota holds its stage too). Greedy
completions then run through it (``--concurrency`` streams), and each stage's busy time per decode step (its
forward call, ``worker_forward_duration_seconds`` from ``/metrics``, plus its event loop's CPU time; each round runs
the streams with 4 tokens and with ``--max-tokens``, and the difference leaves the decodes: the prompts' forward
calls cancel out) is set against the plan's predicted ms per token for that stage.

The development machine is shared, and its speed drifts by 20 % within minutes (a speed measured by bench-host and
the same layers decoded a minute later, alone on the same core: 1.19 x). So the measurement runs in rounds: each
round re-measures both hosts' speeds on the same timing files (a confined host in a child process confined as
it is: pinned, under its quota, beside its busy loop), predicts the planned stages' times from them (same
split), then serves the requests; the table gives the median over rounds next to the prediction made at planning
time. Figures are printed; nothing here passes or fails.

    .venv/bin/python scripts/bench_plan.py                    # a few minutes on 2 cores
    .venv/bin/python scripts/bench_plan.py --rounds 9 --max-tokens 96 --hosts threads
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import statistics
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# NOTE: before llama.cpp starts its OpenMP threads: the stage processes run with the same setting (serve.py).
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import benchlib  # noqa: E402, F401 - puts the repository on sys.path
from benchlib.children import Children, exit_on_sigterm, wait_http, workdir  # noqa: E402
from benchlib.stats import counters_delta, cpu_seconds, stage_counters  # noqa: E402

from chatloop.demo import demo_gguf  # noqa: E402
from chatloop.http_util import free_port  # noqa: E402
from chatloop.plan.bench_host import Workload, measure, prepare  # noqa: E402
from chatloop.plan.hosts import load_hosts  # noqa: E402
from chatloop.plan.model_shape import from_gguf  # noqa: E402
from chatloop.plan.planner import build_problem, make_plan  # noqa: E402
from chatloop.plan.render import TOKEN_FILE, table, write_outputs  # noqa: E402
from chatloop.plan.served_step import event_loop_cpu_s  # noqa: E402
from chatloop.plan.solver import host_time  # noqa: E402
from converters.convert import ConvertRequest, convert  # noqa: E402

log = logging.getLogger("bench_plan")

PROMPT = "Explain how a steam engine works, step by step:"
SHORT_TOKENS = 4  # the short run of each round: its forward calls are the prompts' plus a few decodes
# Two "hosts" on this machine, by --hosts: (name, llama.cpp threads, cores it is pinned to, CPU quota as a share of
# one core per period; None = none). "threads": unpinned, 1 vs 2 threads (they share the cores, so neither is a
# machine of its own); "quota": each on a core of its own, one of them held to half of it (a slower machine, but
# only under sustained load: a quota throttles whole 100 ms periods, so a stage that is busy less than half the
# time runs at full speed); "busy": each on a core of its own, one core shared with a busy loop (CFS gives each
# half of it within milliseconds, so that host is half as fast whatever its load).
HOST_SETS = {
    "threads": (("one-thread", 1, None, None), ("two-threads", 2, None, None)),
    "quota": (("full-core", 1, "0", None), ("half-core", 1, "1", 0.5)),
    "busy": (("full-core", 1, "0", None), ("shared-core", 1, "1", None)),
}
BUSY_LOOPS = {"busy": ("1",)}  # cores given a busy loop for the whole run, by host set
CGROUP_V1 = pathlib.Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = pathlib.Path("/sys/fs/cgroup")


def make_cgroup(name: str, share: float | None) -> pathlib.Path | None:
    """A cgroup holding its processes to ``share`` of one core (cgroup v2 ``cpu.max`` or v1 CFS quota); needs root."""
    if share is None:
        return None
    period = 100_000
    if (CGROUP_V2 / "cgroup.controllers").is_file():
        path = CGROUP_V2 / f"chatloop-bench-{name}"
        path.mkdir(exist_ok=True)
        (path / "cpu.max").write_text(f"{int(period * share)} {period}")
    else:
        path = CGROUP_V1 / f"chatloop-bench-{name}"
        path.mkdir(exist_ok=True)
        (path / "cpu.cfs_period_us").write_text(str(period))
        (path / "cpu.cfs_quota_us").write_text(str(int(period * share)))
    return path


def confined(cmd: list[str], cores: str | None, cgroup: pathlib.Path | None) -> list[str]:
    """``cmd`` started inside ``cgroup`` (before it runs anything) and pinned to ``cores``."""
    if cores:
        cmd = ["taskset", "-c", cores, *cmd]
    enter = f"echo $$ > {cgroup}/cgroup.procs && " if cgroup else ""
    return ["sh", "-c", enter + 'exec "$@"', "sh", *cmd]


def bench_host_speed(gguf: pathlib.Path, threads: int, steps: int, cores, cgroup) -> dict[str, float]:
    """The ``speed`` entry of ``chatloop bench-host`` run as the host: pinned and under its quota."""
    cmd = [sys.executable, "-m", "chatloop.cli", "--log-level", "WARNING", "bench-host", "--model", str(gguf)]
    cmd += ["--threads", str(threads), "--steps", str(steps)]
    out = subprocess.run(confined(cmd, cores, cgroup), check=True, capture_output=True, text=True).stdout
    speed = yaml.safe_load(out)[0]["speed"]
    return {k: speed.get(k) for k in ("decode_gb_s", "step_overhead_ms", "last_step_overhead_ms", "head_gb_s")}


def confined_speed(workload: Workload, threads: int, steps: int, cores, cgroup) -> dict[str, float]:
    """A round's speed of a confined host: the planning-time timing files measured again by a child process
    confined as the host (``--measure-child``), so that the round's prediction follows the machine's drift."""
    spec = json.dumps({k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(workload).items()})
    cmd = [sys.executable, __file__, "--measure-child", spec, "--bench-steps", str(steps), "--threads", str(threads)]
    out = subprocess.run(confined(cmd, cores, cgroup), check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_child(spec: str, threads: int, steps: int) -> int:
    fields = json.loads(spec)
    paths = {k: pathlib.Path(v) for k, v in fields.items() if k in ("many", "one", "last") and v is not None}
    print(json.dumps(speed_of(measure(Workload(**{**fields, **paths}), threads, steps, (1,), bandwidth=False))))
    return 0


def speed_of(r) -> dict[str, float]:
    """The ``speed`` figures of a hosts.yaml entry from a bench-host measurement at 1 row."""
    return {
        "decode_gb_s": r.decode_gb_s(1),
        "step_overhead_ms": r.timings[0].step_overhead_ms,
        "last_step_overhead_ms": r.timings[0].last_step_overhead_ms,
        "head_gb_s": r.head_gb_s(1),
    }


def completion(url: str, max_tokens: int) -> int:
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())["usage"]["completion_tokens"]


def hosts_yaml(speeds: dict[str, dict[str, float]], model_dir: pathlib.Path, ports: dict[str, int], hosts) -> dict:
    return {
        "context_tokens": 512,
        "sequences": 4,
        "coordinator_port": ports["coordinator"],
        "model_path": str(model_dir),
        "hosts": [
            {
                "name": name,
                "address": "127.0.0.1",
                "memory_gb": 2,
                "cores": threads,
                "port": ports[name],
                **({"cpu_cores": cores} if cores else {}),
                "speed": {**{k: round(v, 4) for k, v in speeds[name].items() if v is not None}, "threads": threads},
            }
            for name, threads, cores, _ in hosts
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests at once per round (default 1: one stream, each stage busy about half the time; "
                        "more keeps every stage busy, as the plan's bottleneck figure assumes)")  # fmt: skip
    p.add_argument("--bench-steps", type=int, default=30, help="decodes per speed timing")
    p.add_argument("--hosts", choices=sorted(HOST_SETS), default="quota",
                   help="the two hosts: quota (a core each, one held to half of it; needs root), busy (a core each, "
                        "one shared with a busy loop) or threads (1 vs 2 threads, unpinned); default quota")  # fmt: skip
    p.add_argument("--coordinator-nice", type=int, default=0,
                   help="niceness of the coordinator process (it shares the hosts' cores here; default 0)")  # fmt: skip
    p.add_argument("--measure-child", help=argparse.SUPPRESS)  # internal: confined_speed's child process
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure_child:
        return measure_child(args.measure_child, args.threads, args.bench_steps)
    hosts_set = HOST_SETS[args.hosts]
    cgroups = {name: make_cgroup(name, share) for name, _, _, share in hosts_set}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    exit_on_sigterm()
    gguf_path = demo_gguf()
    shape = from_gguf(gguf_path)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    spin = [sys.executable, "-c", "while True: pass"]
    busy = [subprocess.Popen(["taskset", "-c", core, *spin]) for core in BUSY_LOOPS.get(args.hosts, ())]
    try:
        return run(args, hosts_set, cgroups, gguf_path, shape)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def run(args, hosts_set, cgroups, gguf_path: pathlib.Path, shape) -> int:
    with workdir() as tmp:
        work = pathlib.Path(tmp)
        workload = prepare(gguf_path, work)  # the timing files every round measures again
        planned: dict[str, dict[str, float]] = {}

        def speeds_now() -> dict[str, dict[str, float]]:
            confined_hosts = [h for h in hosts_set if h[2] or cgroups[h[0]]]
            out: dict[str, dict[str, float]] = {}
            if confined_hosts:
                # Measured as the hosts run: pinned and under their quotas, all at once; for the plan by `chatloop
                # bench-host` itself, as a user runs it on each machine. NOTE: these "hosts" share one memory
                # system and L3 cache, and served they decode at the same time: measured one after the other,
                # each would see the memory to itself.
                def one(h) -> dict[str, float]:
                    if not planned:
                        return bench_host_speed(gguf_path, h[1], args.bench_steps, h[2], cgroups[h[0]])
                    return confined_speed(workload, h[1], args.bench_steps, h[2], cgroups[h[0]])

                with ThreadPoolExecutor(len(confined_hosts)) as pool:
                    out.update(zip((h[0] for h in confined_hosts), pool.map(one, confined_hosts)))
            for name, threads, _, _ in hosts_set:
                if name not in out:
                    out[name] = speed_of(measure(workload, threads, args.bench_steps, rows_list=(1,), bandwidth=False))
            planned.update({} if planned else out)
            return out

        ports = {"coordinator": free_port(), **{name: free_port() for name, *_ in hosts_set}}
        model_dir = work / "model"
        hosts_doc = hosts_yaml(speeds_now(), model_dir, ports, hosts_set)
        (work / "hosts.yaml").write_text(yaml.safe_dump(hosts_doc, sort_keys=False))
        hosts = load_hosts(work / "hosts.yaml")
        plan = make_plan(shape, hosts)
        print(table(plan, hosts), flush=True)
        out = work / "plan"
        write_outputs(plan, hosts, out)
        convert(ConvertRequest(source=str(gguf_path), out=model_dir, layers=plan.layers_arg, quant=plan.quant))
        procs = [(s, proc) for s in plan.stages for proc in s.processes]
        token = dict(
            line.split("=", 1) for line in (out / TOKEN_FILE).read_text().splitlines() if line and line[0] != "#"
        )  # the plan's cluster token, as `set -a; . cluster-token.env` gives it to a shell
        cluster_token = next(iter(token.values()))
        children = Children(work)
        rows: dict[str, list[tuple[float, float, float]]] = {proc.url: [] for _, proc in procs}
        try:
            started = []
            for s, proc in procs:
                cfg = out / f"stage-{proc.stage}-{proc.host}.yaml"
                cmd = [sys.executable, "-m", "chatloop.cli", "stage", "--config", str(cfg)]
                cmd = confined(cmd, None, cgroups[proc.host])  # the stage pins itself (cpu_cores from the plan)
                started.append(
                    (s, proc, f"http://127.0.0.1:{proc.port}", children.start(f"stage-{s.index}", cmd, token))
                )
            for _, _, url, child in started:
                wait_http(f"{url}/readyz", child)
            cmd = [sys.executable, "-m", "chatloop.cli", "coordinator", "--config", str(out / "coordinator.yaml")]
            if args.coordinator_nice:
                cmd = ["nice", "-n", str(args.coordinator_nice), *cmd]
            coord = children.start("coordinator", cmd, token)
            url = f"http://127.0.0.1:{plan.coordinator_port}"
            wait_http(f"{url}/readyz", coord)
            completion(url, 8)  # warm-up
            for r in range(args.rounds):
                hosts_r = load_hosts_from(work, speeds_now(), model_dir, ports, hosts_set)
                problem = build_problem(shape, hosts_r)
                index = {h.name: i for i, h in enumerate(hosts_r.hosts)}
                # NOTE: a request's forward calls include its prompt's (whole 64-row blocks, many decodes' worth);
                # the plan predicts decodes. So every round runs the streams twice, SHORT_TOKENS and --max-tokens
                # tokens, and the decodes are the difference: same prompts, more decodes.
                snaps = [snapshot(started, cluster_token)]
                for n in (SHORT_TOKENS, args.max_tokens):
                    with ThreadPoolExecutor(args.concurrency) as pool:  # streams at once: every stage kept busy
                        list(pool.map(lambda _, n=n: completion(url, n), range(args.concurrency)))
                    snaps.append(snapshot(started, cluster_token))
                for s, proc, u, _ in started:
                    short = counters_delta(snaps[0][u], snaps[1][u])
                    long = counters_delta(snaps[1][u], snaps[2][u])
                    forwards = long["forwards"] - short["forwards"]
                    if forwards <= 0:
                        continue  # a replica the coordinator did not route these streams to
                    per = {k: 1e3 * (long[k] - short[k]) / forwards for k in ("forward_s", "cpu_s", "loop_s")}
                    rows_per_forward = (long["batch_rows"] - short["batch_rows"]) / max(
                        long["batches"] - short["batches"], 1
                    )
                    # A step keeps the stage busy for its forward call and its event loop's work; the loop's CPU
                    # time is stretched as the decodes' is (forward wall / decode CPU) on a core shared with others.
                    decode_cpu = max(per["cpu_s"] - per["loop_s"], 1e-9)
                    busy = per["forward_s"] + per["loop_s"] * per["forward_s"] / decode_cpu
                    predicted = host_time(problem, index[proc.host], s.start, s.end)
                    rows[proc.url].append((predicted, busy, per["forward_s"], per["cpu_s"]))
                    log.info(
                        "round %d stage %d: predicted %.2f ms, busy %.2f ms (forward %.2f, event loop CPU %.2f, "
                        "process CPU %.2f) a step of %.2f rows",
                        *(r, s.index, predicted, busy, per["forward_s"], per["loop_s"], per["cpu_s"], rows_per_forward),
                    )
        finally:
            children.stop()
            for cgroup in cgroups.values():
                if cgroup is not None:
                    cgroup.rmdir()  # empty once its processes are gone
    print(f"\n{args.rounds} rounds of {args.concurrency} greedy request(s) at once ({args.max_tokens} tokens each)")
    print(f"load average at the end: {os.getloadavg()}")
    head = f"{'stage':<6}{'host':<13}{'layers':<8}{'planned ms':>11}{'round pred ms':>14}{'busy ms':>9}"
    print(head + f"{'busy/round pred':>17}{'busy/planned':>14}{'forward ms':>12}{'CPU ms':>8}")
    for s, proc in procs:
        got = rows[proc.url]
        if not got:
            print(
                f"{s.index:<6}{proc.host:<13}{f'{s.start}:{s.end}':<8}{proc.ms_per_token:>11.2f}  (no decodes routed here)"
            )
            continue
        pred, busy, forward, cpu = (statistics.median(g[i] for g in got) for i in range(4))
        ratio = statistics.median(g[1] / g[0] for g in got)
        print(
            f"{s.index:<6}{proc.host:<13}{f'{s.start}:{s.end}':<8}{proc.ms_per_token:>11.2f}{pred:>14.2f}"
            f"{busy:>9.2f}{ratio:>17.2f}{busy / proc.ms_per_token:>14.2f}{forward:>12.2f}{cpu:>8.2f}"
        )
    print(
        "busy ms: a step's forward call (wall time, the stage's worker_forward_duration_seconds) plus its event\n"
        "loop's work (main-thread CPU, stretched as the decodes' CPU is to their wall time), per decode step, from a\n"
        f"run of --max-tokens less one of {SHORT_TOKENS} tokens (prompts cancel out); forward ms: the forward call\n"
        "alone; CPU ms: the whole stage process's CPU time per step. Under a quota the wall time includes the\n"
        "throttled periods and CPU ms does not."
    )
    return 0


def snapshot(started, token: str) -> dict[str, dict[str, float]]:
    """Every stage's forward counters, its process's CPU seconds and its event loop's, by URL."""
    return {
        u: {**stage_counters(u, token), "cpu_s": cpu_seconds([child.pid]), "loop_s": event_loop_cpu_s(child.pid)}
        for _, _, u, child in started
    }


def load_hosts_from(work: pathlib.Path, speeds, model_dir: pathlib.Path, ports: dict[str, int], hosts_set):
    path = work / "hosts-round.yaml"
    path.write_text(yaml.safe_dump(hosts_yaml(speeds, model_dir, ports, hosts_set), sort_keys=False))
    return load_hosts(path)


if __name__ == "__main__":
    sys.exit(main())
