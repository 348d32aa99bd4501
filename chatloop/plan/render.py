"""A plan for people (a table) and for machines (plan.json, stage and coordinator configs, compose, convert)."""

from __future__ import annotations

import math
import os
import pathlib
import secrets
import shlex

import yaml

from chatloop.plan.hosts import HostsFile
from chatloop.plan.planner import Plan, Process

STAGE_IMAGE = "chatloop/stage:0.1.0"
COORDINATOR_IMAGE = "chatloop/coordinator:0.1.0"
_UBATCH_DEFAULT = 32  # chatloop.config.Performance.n_ubatch: a stage's max_sequences may not exceed it
# The deployment's shared secret (security.cluster_token of every stage and the coordinator, from the environment):
# the planned processes listen on 0.0.0.0, which chatloop/bind_policy.py refuses without a token.
TOKEN_FILE = "cluster-token.env"
TOKEN_VARIABLE = "CHATLOOP_SECURITY__CLUSTER_TOKEN"


def table(plan: Plan, hosts: HostsFile) -> str:
    """The plan as a text table: one row per stage process."""
    memory = {h.name: h.memory_gb * 1024 for h in hosts.hosts}
    head = ("host", "stage", "layers", "weights MiB", "KV MiB", "memory MiB", "ms/token", "stage ms", "of bottleneck")
    rows = [head]
    for s in plan.stages:
        for p in s.processes:
            rows.append(
                (
                    p.host + (" (spare)" if p.spare else ""),
                    f"{s.index}" + (f" r{p.replica}" if len(s.processes) > 1 else ""),
                    f"{s.start}:{s.end}",
                    f"{s.weights_mb:,.0f}",
                    f"{s.kv_mb:,.0f}",
                    f"{p.memory_mb:,.0f} / {memory[p.host]:,.0f}",
                    f"{p.ms_per_token:.2f}",
                    f"{s.ms_per_token:.2f}",
                    f"{100 * s.ms_per_token / plan.bottleneck_ms:.0f} %",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = [
        f"{plan.model} ({plan.arch}, {plan.n_layer} layers) at {plan.quant}, "
        f"KV for {plan.context_tokens} tokens x {plan.sequences} sequences",
        *lines,
        f"bottleneck: {plan.bottleneck_ms:.2f} ms per token -> at most {1000 / plan.bottleneck_ms:.1f} tokens/s "
        f"through the pipeline with every stage busy (one stream sees the sum of its stages plus network hops)",
    ]
    one_stream = sum(s.processes[0].ms_per_token for s in plan.stages)
    out.append(
        f"one stream: about {one_stream:.2f} ms per token (its stages in turn) plus a network round trip a stage"
    )
    if plan.chain_ms > plan.bottleneck_ms * (1 + 1e-9):
        out.append(f"without the extra replicas: {plan.chain_ms:.2f} ms per token (the slowest single host's stage)")
    if plan.unused_hosts:
        out.append(f"unused hosts: {', '.join(plan.unused_hosts)}")
    out += [f"note: {n}" for n in plan.notes]
    return "\n".join(out)


def convert_command(plan: Plan, out: pathlib.Path) -> str:
    source = plan.source or "SOURCE"
    args = ["chatloop", "convert", source, "--layers", plan.layers_arg, "--quant", plan.quant, "--out", str(out)]
    return shlex.join(args)


def stage_file_name(p: Process) -> str:
    return f"stage-{p.stage}-{p.host}.yaml"


def stage_config(plan: Plan, p: Process) -> dict:
    s = plan.stages[p.stage]
    perf: dict = {"kv_cache_mb": max(1, math.ceil(s.kv_mb)), "n_threads": p.threads}
    if plan.sequences > _UBATCH_DEFAULT:
        perf["n_ubatch"] = plan.sequences
    if p.cpu_cores:
        perf["enable_cpu_pinning"], perf["cpu_cores"] = True, p.cpu_cores
    if p.numa_node is not None:
        perf["numa_node"] = p.numa_node
    return {
        "weights_path": f"{plan.model_path}/stage-{p.stage}.gguf",
        "layer_group": p.stage,
        "worker_id": f"stage-{p.stage}-{p.host}",
        "host": "0.0.0.0",
        "port": p.port,
        "max_sequences": plan.sequences,
        "performance": perf,
    }


def coordinator_config(plan: Plan) -> dict:
    return {
        "stages": [[p.url for p in s.processes] for s in plan.stages],
        "model_dir": plan.model_path,
        "host": "0.0.0.0",
        "port": plan.coordinator_port,
        "batching": {"max_batch_size": plan.sequences},
    }


def compose(plan: Plan) -> dict:
    """One compose file for every host: ``docker compose --profile HOST up -d`` on each host starts its part."""
    services: dict = {}
    for s in plan.stages:
        for p in s.processes:
            services[f"stage-{p.stage}-{p.host}"] = {
                "image": STAGE_IMAGE,
                "profiles": [p.host],
                "command": ["--config", "/etc/chatloop/stage.yaml"],
                "env_file": [TOKEN_FILE],
                "restart": "unless-stopped",
                "stop_grace_period": "45s",
                "cpus": p.threads,
                "ports": [f"{p.port}:{p.port}"],
                "volumes": [
                    {"type": "bind", "source": plan.model_path, "target": plan.model_path, "read_only": True},
                    {
                        "type": "bind",
                        "source": f"./{stage_file_name(p)}",
                        "target": "/etc/chatloop/stage.yaml",
                        "read_only": True,
                    },
                ],
            }
    services["coordinator"] = {
        "image": COORDINATOR_IMAGE,
        "profiles": [plan.coordinator_host],
        "command": ["--config", "/etc/chatloop/coordinator.yaml"],
        "env_file": [TOKEN_FILE],
        "restart": "unless-stopped",
        "stop_grace_period": "45s",
        "ports": [f"{plan.coordinator_port}:{plan.coordinator_port}"],
        "volumes": [
            {"type": "bind", "source": plan.model_path, "target": plan.model_path, "read_only": True},
            {
                "type": "bind",
                "source": "./coordinator.yaml",
                "target": "/etc/chatloop/coordinator.yaml",
                "read_only": True,
            },
        ],
    }
    return {"name": "chatloop-plan", "services": services}


def write_outputs(plan: Plan, hosts: HostsFile, out: pathlib.Path) -> list[pathlib.Path]:
    """Write plan.json, convert.sh, one stage config per process, coordinator.yaml, compose.yaml and a new cluster
    token (``cluster-token.env``, readable by its owner only) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name: str, text: str, mode: int = 0o644) -> None:
        path = out / name
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        written.append(path)

    put("plan.json", plan.to_json())
    put("plan.txt", table(plan, hosts) + "\n")
    put(
        "convert.sh",
        "#!/bin/sh\n# Slice the model as planned, then copy the folder to "
        f"{plan.model_path} on every host.\n{convert_command(plan, out / 'model')}\n",
    )
    put(
        TOKEN_FILE,
        "# The cluster token of this deployment: every stage and the coordinator need it (copy it with the configs,\n"
        "# keep it private). Docker compose reads it (env_file); without Docker, before chatloop stage/coordinator:\n"
        f"#   set -a; . ./{TOKEN_FILE}; set +a\n{TOKEN_VARIABLE}={secrets.token_hex(32)}\n",
        mode=0o600,
    )
    token_note = f"# The cluster token comes from the environment ({TOKEN_VARIABLE}, see {TOKEN_FILE}).\n"
    for s in plan.stages:
        for p in s.processes:
            header = f"# stage {p.stage} ({s.start}:{s.end}) on {p.host}: written by chatloop plan\n" + token_note
            put(stage_file_name(p), header + yaml.safe_dump(stage_config(plan, p), sort_keys=False))
    header = "# The coordinator of the planned deployment: written by chatloop plan\n" + token_note
    put("coordinator.yaml", header + yaml.safe_dump(coordinator_config(plan), sort_keys=False))
    header = (
        "# Start each host's part with: docker compose -f compose.yaml --profile HOST up -d\n"
        f"# ({', '.join(sorted({p.host for s in plan.stages for p in s.processes}))}; the coordinator runs on "
        f"{plan.coordinator_host}). The converted model must be at {plan.model_path} on every host, and\n"
        f"# {TOKEN_FILE} next to this file.\n"
    )
    put("compose.yaml", header + yaml.safe_dump(compose(plan), sort_keys=False))
    return written
