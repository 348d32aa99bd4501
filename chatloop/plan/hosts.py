"""``hosts.yaml``: the machines a deployment may use, validated when loaded like every ChatLoop config.

The file is read with ``chatloop.config.load_config`` (frozen dataclasses, unknown keys and bad values are
errors naming the file and the key); the checks that span several fields (duplicate names, a NUMA node list
with repeats, a coordinator host that is not listed) follow here.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from chatloop.config import ConfigError, load_config

# Without a measured speed a host is assumed to decode this many GB of weights per second per core. A rough
# figure for current x86 servers at one row per decode (measured here: ~6 GB/s a core on 2 EPYC cores); only
# the ratio between hosts decides the split, the absolute value only the predicted milliseconds.
DEFAULT_DECODE_GB_S_PER_CORE = 5.0

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class HostSpeed:
    decode_gb_s: float  # GB (1e9 bytes) of stage weights one-row decoding streams per second (chatloop bench-host)
    # fixed cost of one step of a stage, whatever its layers: its decode call's (graph, thread wake-up) and its
    # process's event loop (frames in, hidden states out to the next stage); bench-host --model measures both
    step_overhead_ms: float = 0.0
    # the same for the last stage, whose event loop replies to the coordinator instead of passing hidden states
    # on (its sampling is in head_gb_s); None = step_overhead_ms
    last_step_overhead_ms: float | None = None
    # GB of output norm + head the last stage streams per second, sampling included (bench-host --model); the
    # head is one wide matrix, often of another type than the layers, so its speed per byte differs.
    # None = decode_gb_s.
    head_gb_s: float | None = None
    decode_gb_s_8rows: float | None = None  # same with 8 rows per decode, per decode (informative)
    memory_gb_s: float | None = None  # measured memory read bandwidth (informative)
    threads: int | None = None  # llama.cpp threads the measurement used


@dataclass(frozen=True)
class Host:
    name: str  # unique name: the stage file and compose service of this host are named after it
    address: str  # hostname or IP the coordinator reaches this host at
    memory_gb: float  # memory ChatLoop may use on this host, in GiB (weights + KV cache + process overhead)
    cores: int  # CPU cores ChatLoop may use (llama.cpp threads of its stage process)
    numa_nodes: tuple[int, ...] = ()  # NUMA nodes to bind stage processes to, in turn; empty = no NUMA policy
    cpu_cores: str | None = None  # pin the stage process to these cores, e.g. "0-15"; null = no pinning
    port: int = 9000  # first port of this host's stage processes (the next process uses the next port)
    speed: HostSpeed | None = None  # measured speed (chatloop bench-host); null = estimated from cores


@dataclass(frozen=True)
class HostsFile:
    hosts: tuple[Host, ...]  # the machines, in the order they are preferred when plans tie
    context_tokens: int = 4096  # KV positions each sequence can hold (prompt + generated tokens)
    sequences: int = 4  # sequences holding KV at once in every stage (stage max_sequences)
    overhead_mb: int = 384  # MiB per stage process beyond weights and KV: compute buffers, Python, aiohttp
    step_overhead_ms: float = 0.5  # fixed ms per step of a stage on hosts without a measured speed
    coordinator_host: str | None = None  # host running the coordinator; null = the first host
    coordinator_port: int = 8000  # port of the coordinator's API
    model_path: str = "/models/planned"  # folder of the converted model on every host (same path everywhere)


def load_hosts(path: str | pathlib.Path) -> HostsFile:
    """Read and check a hosts file; ``ConfigError`` names the file, the key and what was expected."""
    # NOTE: env={}: CHATLOOP_* variables are meant for servers; a plan must depend on its files alone.
    cfg = load_config(HostsFile, path, env={})
    try:
        check_hosts(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def check_hosts(cfg: HostsFile) -> None:
    if not cfg.hosts:
        raise ConfigError("hosts: needs at least one host")
    seen: dict[str, int] = {}
    for i, h in enumerate(cfg.hosts):
        where = f"hosts[{i}]"
        if not h.name.strip():
            raise ConfigError(f"{where}.name: must not be empty")
        if not all(c.isalnum() or c in "-_." for c in h.name):
            raise ConfigError(f"{where}.name: letters, digits, '-', '_' and '.' only (it names files), got {h.name!r}")
        if h.name in seen:
            raise ConfigError(f"{where}.name: duplicate host name {h.name!r} (also hosts[{seen[h.name]}])")
        seen[h.name] = i
        if not h.address.strip():
            raise ConfigError(f"{where}.address: must not be empty")
        if not h.memory_gb > 0:
            raise ConfigError(f"{where}.memory_gb: must be greater than 0, got {h.memory_gb}")
        if h.cores <= 0:
            raise ConfigError(f"{where}.cores: must be greater than 0, got {h.cores}")
        if any(n < 0 for n in h.numa_nodes) or len(set(h.numa_nodes)) != len(h.numa_nodes):
            raise ConfigError(f"{where}.numa_nodes: distinct node numbers of 0 or more, got {list(h.numa_nodes)}")
        if h.speed is not None:
            s = h.speed
            if not s.decode_gb_s > 0:
                raise ConfigError(f"{where}.speed.decode_gb_s: must be greater than 0, got {s.decode_gb_s}")
            if s.head_gb_s is not None and not s.head_gb_s > 0:
                raise ConfigError(f"{where}.speed.head_gb_s: must be greater than 0, got {s.head_gb_s}")
            for key in ("step_overhead_ms", "last_step_overhead_ms"):
                value = getattr(s, key)
                if value is not None and value < 0:
                    raise ConfigError(f"{where}.speed.{key}: must be 0 or more, got {value}")
    for key in ("context_tokens", "sequences", "overhead_mb"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {getattr(cfg, key)}")
    if cfg.step_overhead_ms < 0:
        raise ConfigError(f"step_overhead_ms: must be 0 or more, got {cfg.step_overhead_ms}")
    if not 0 < cfg.coordinator_port <= 65535:
        raise ConfigError(f"coordinator_port: must be a port number (1-65535), got {cfg.coordinator_port}")
    if cfg.coordinator_host is not None and cfg.coordinator_host not in seen:
        raise ConfigError(f"coordinator_host: {cfg.coordinator_host!r} is not one of the hosts ({', '.join(seen)})")


def decode_bytes_per_ms(host: Host) -> float:
    """Weight bytes this host's stage process streams per millisecond of one-row decode."""
    gb_s = host.speed.decode_gb_s if host.speed else host.cores * DEFAULT_DECODE_GB_S_PER_CORE
    return gb_s * 1e9 / 1e3


def head_bytes_per_ms(host: Host) -> float:
    """Output-head bytes this host's last stage streams per millisecond (its layers' speed when not measured)."""
    if host.speed is not None and host.speed.head_gb_s is not None:
        return host.speed.head_gb_s * 1e9 / 1e3
    return decode_bytes_per_ms(host)


def step_overhead_ms(host: Host, default: float) -> float:
    return host.speed.step_overhead_ms if host.speed else default


def last_step_overhead_ms(host: Host, default: float) -> float:
    """The fixed cost of a step of the last stage on ``host`` (a first or middle stage's when not measured)."""
    if host.speed is not None and host.speed.last_step_overhead_ms is not None:
        return host.speed.last_step_overhead_ms
    return step_overhead_ms(host, default)
