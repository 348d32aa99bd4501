"""Configuration: frozen dataclasses built from YAML, validated when loaded, overridable from the environment.

An unknown key or a bad value is a ``ConfigError`` naming the file, the key and what was expected.
Environment variables ``CHATLOOP_<KEY>`` override top-level keys and ``CHATLOOP_<SECTION>__<KEY>`` nested ones
(for example ``CHATLOOP_BATCHING__MAX_BATCH_SIZE=8``); values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import types
import typing
from dataclasses import dataclass, field

import yaml

from chatloop.protocol.messages import BLOCK_ROWS, MAX_DRAFT


class ConfigError(ValueError):
    pass


# -- shared sections -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageBatching:
    max_batch_size: int = 16  # most sequences merged into one llama_decode
    batching_window_ms: float = 3.0  # how long a forward call waits for others to join its decode
    max_queue_size: int = 64  # forward calls waiting at most; beyond it: 503 with Retry-After
    # a first or middle stage passes a long prompt chunk on in parts of this many rows (a multiple of 64), so that
    # the next stage starts on it while this one computes the rest; 0 = whole chunks
    prompt_part_rows: int = 64
    # a step of at most this many rows decodes on the event loop's thread when the llama.cpp thread is idle (no
    # thread hand-off), as long as such steps take under INLINE_MAX_SECS (stage/batcher.py); 0 = never
    inline_max_rows: int = 16


@dataclass(frozen=True)
class Performance:
    kv_cache_mb: int = 512  # KV cache budget of this process in MiB, split evenly between max_sequences
    n_threads: int = 0  # llama.cpp threads; 0 = the pinned cores, else all cores
    n_batch: int = 512  # most rows in one llama_decode (also the prefill chunk ceiling)
    n_ubatch: int = 512  # rows computed at once; prompts run in whole 64-row blocks, so keep it a multiple of 64
    enable_cpu_pinning: bool = False  # pin this process (and llama.cpp's threads) to cpu_cores
    cpu_cores: str | None = None  # cores to pin to, e.g. "0-15" or "0,2,4"
    numa_node: int | None = None  # NUMA node whose memory and cores to use (llama.cpp NUMA support)


@dataclass(frozen=True)
class Observability:
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR
    log_format: str = "auto"  # json (one object a line), text (time, level, message) or auto (text on a terminal)


@dataclass(frozen=True)
class Security:
    cluster_token: str | None = None  # shared secret every stage endpoint requires (X-ChatLoop-Token)
    api_keys: tuple[str, ...] = ()  # coordinator: accepted "Authorization: Bearer" keys; empty = open


# -- stage ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    weights_path: str  # the stage GGUF file (its manifest is read from the same folder)
    worker_id: str = ""  # name in logs and metrics; default "stage-<index>"
    layer_group: int | None = None  # stage index in the manifest; default: the one whose file is weights_path
    host: str = "127.0.0.1"  # address to bind
    port: int = 9000  # port to bind
    allow_insecure: bool = False  # start on a non-loopback host without security.cluster_token (trusted networks only)
    verify_sha256: bool = True  # check the file against the manifest before loading
    max_sequences: int = 16  # sequences with live KV at once (each gets kv_cache_mb / max_sequences of KV)
    frame_max_bytes: int = 64 * 1024 * 1024  # largest forward frame accepted
    drain_grace_secs: float = 30.0  # on SIGTERM: time in-flight work gets before exit
    idle_sequence_timeout_secs: float = 600.0  # free a sequence's KV after this long without a step
    batching: StageBatching = field(default_factory=StageBatching)
    performance: Performance = field(default_factory=Performance)
    observability: Observability = field(default_factory=Observability)
    security: Security = field(default_factory=Security)


# -- coordinator ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoordinatorBatching:
    max_batch_size: int = 16  # sequences decoding together at most (all micro-batches)
    max_queue_size: int = 256  # requests waiting for admission at most; beyond it: 503
    queue_timeout_secs: float = 120.0  # a request waiting longer for admission gets 503
    prefill_chunk_tokens: int = 256  # prompt tokens per step: bounds how long a new prompt delays others
    pipeline_depth: int = 0  # micro-batches in flight; 0 = one per stage


SPECULATIVE_METHODS = ("off", "ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "off"  # proposals to verify several tokens per pass: ngram (prompt lookup), draft (a model) or off
    max_tokens: int = 8  # most proposed tokens per step for one sequence (1..62); fewer where they do not pay
    # fewest proposed tokens per step where the source has them (at most max_tokens), like llama.cpp's --draft-min;
    # 0 = only as many as are expected to pay for their rows
    min_tokens: int = 0
    ngram_min: int = 2  # shortest suffix of the text that prompt lookup matches, in tokens
    ngram_max: int = 4  # longest suffix it tries first, in tokens
    draft_model: str | None = None  # method draft: a small GGUF with the served model's vocabulary, run here
    draft_threads: int = 1  # llama.cpp threads of the draft model


@dataclass(frozen=True)
class CoordinatorConfig:
    stages: tuple[tuple[str, ...], ...]  # per stage, the base URLs of its replicas, in chain order
    model_dir: str | None = None  # converted model folder (for the tokenizer); default: fetched from stage 0
    model_name: str | None = None  # name served in /v1/models; default: the manifest's
    host: str = "127.0.0.1"  # address to bind
    port: int = 8000  # port to bind
    allow_insecure: bool = False  # start on a non-loopback host without security.cluster_token (trusted networks only)
    health_check_interval_secs: float = 2.0  # how often every replica is probed
    failure_threshold: int = 3  # consecutive failures that mark a replica unhealthy
    recovery_threshold: int = 2  # consecutive successes that bring it back
    connect_timeout_secs: float = 2.0  # TCP connect timeout per hop
    step_timeout_secs: float = 30.0  # longest a forward call may take (first calls, long prompt chunks)
    step_timeout_floor_secs: float = 5.0  # shortest deadline: a call's deadline is factor x its usual time, >= this
    step_timeout_factor: float = 20.0  # deadline = factor x the replica's recent time for such calls (decode/prefill)
    wire_dtype: str = "f32"  # hidden states between stages: f32 (exact) or f16 (half the bytes)
    topology: str = "chain"  # chain: stage to stage over streams; star: every step through the coordinator
    # chain: the last stage passes a decoding micro-batch's sampled tokens straight on to stage 0 as its next step
    # (the coordinator's turn leaves the per-token path); false: every step goes out from the coordinator
    ring_steps: bool = True
    max_retries: int = 3  # failovers per step before the request fails
    max_tokens_default: int = 256  # max_tokens when a request gives none
    max_prompt_bytes: int = 1_000_000  # largest prompt accepted
    max_body_bytes: int = 4 * 1024 * 1024  # largest request body
    kv_cache_tokens: int = 0  # admission budget in positions; 0 = the smallest stage's KV capacity
    prefix_cache: bool = True  # keep finished sequences' KV in the stages and reuse it for prompts that start alike
    prefix_cache_tokens: int = 0  # most tokens the prefix cache holds (all entries); 0 = bounded by stage slots only
    # true: reuse only KV a full prefill computes bit for bit (whole 64-token blocks of earlier prompts); false: every
    # cached position (earlier replies too, as llama-server's cache_prompt): faster next turns, logits differ slightly
    prefix_cache_exact: bool = True
    drain_grace_secs: float = 30.0  # on SIGTERM: time in-flight requests get before exit
    batching: CoordinatorBatching = field(default_factory=CoordinatorBatching)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    observability: Observability = field(default_factory=Observability)
    security: Security = field(default_factory=Security)


# -- whole cluster on one machine (chatloop serve) -----------------------------------------------------


@dataclass(frozen=True)
class ClusterStage:
    replicas: int = 1  # processes serving this stage
    cpu_cores: str | None = None  # pin these processes to cores (enables pinning)
    n_threads: int = 0  # llama.cpp threads; 0 = default


@dataclass(frozen=True)
class ClusterConfig:
    model_dir: str | None = None  # converted model; None = the demo model
    host: str = "127.0.0.1"  # coordinator address (stages always bind 127.0.0.1)
    port: int = 8000  # coordinator port
    allow_insecure: bool = False  # coordinator on a non-loopback host without security.cluster_token (trusted networks)
    stage_base_port: int = 0  # first stage port; 0 = free ports
    restart_backoff_secs: float = 1.0  # first delay before restarting a crashed stage (doubles, max 30 s)
    stage_defaults: StageBatching = field(default_factory=StageBatching)
    performance: Performance = field(default_factory=Performance)
    stages: tuple[ClusterStage, ...] = ()  # per stage overrides; empty = one replica each
    coordinator: dict = field(default_factory=dict)  # extra coordinator keys (as in coordinator.yaml)
    observability: Observability = field(default_factory=Observability)
    security: Security = field(default_factory=Security)


# -- loading -------------------------------------------------------------------------------------------

T = typing.TypeVar("T")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if value is None:
            return ()  # an empty YAML value or CHATLOOP_X="" means an empty list
        if isinstance(value, str) and args and args[0] is str:
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else typing.Any
        return tuple(_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type[T], data, where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key missing ({_type_name(hints[f.name])})")
    obj = cls(**kwargs)
    _validate(obj, where)
    return obj


_POSITIVE = {
    "port",
    "max_batch_size",
    "max_queue_size",
    "kv_cache_mb",
    "n_batch",
    "failure_threshold",
    "recovery_threshold",
    "max_sequences",
    "frame_max_bytes",
    "prefill_chunk_tokens",
    "max_tokens_default",
    "max_prompt_bytes",
    "max_body_bytes",
    "health_check_interval_secs",
    "connect_timeout_secs",
    "step_timeout_secs",
    "step_timeout_floor_secs",
    "step_timeout_factor",
    "replicas",
}
_NON_NEGATIVE = {
    "batching_window_ms",
    "prompt_part_rows",
    "inline_max_rows",
    "n_threads",
    "pipeline_depth",
    "max_retries",
    "stage_base_port",
    "kv_cache_tokens",
    "prefix_cache_tokens",
    "drain_grace_secs",
    "queue_timeout_secs",
    "restart_backoff_secs",
}


def _validate(obj, where: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{where}.{f.name}" if where else f.name
        if f.name in _POSITIVE and isinstance(v, (int, float)) and v <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {v}")
        if f.name in _NON_NEGATIVE and isinstance(v, (int, float)) and v < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {v}")
        if f.name == "port" and isinstance(v, int) and v > 65535:
            raise ConfigError(f"{key}: must be a port number (1-65535), got {v}")
        if f.name == "log_level" and str(v).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"{key}: expected DEBUG, INFO, WARNING or ERROR, got {v!r}")
        if f.name == "wire_dtype" and v not in ("f32", "f16"):
            raise ConfigError(f"{key}: expected f32 or f16, got {v!r}")
        if f.name == "prompt_part_rows" and isinstance(v, int) and v % BLOCK_ROWS:
            raise ConfigError(f"{key}: must be a multiple of {BLOCK_ROWS} (0 = whole chunks), got {v}")
        if f.name == "topology" and v not in ("star", "chain"):
            raise ConfigError(f"{key}: expected star or chain, got {v!r}")
        if isinstance(obj, SpeculativeConfig):
            _validate_speculative(obj, f.name, v, key)
        if f.name == "log_format" and v not in ("auto", "json", "text"):
            raise ConfigError(f"{key}: expected auto, json or text, got {v!r}")
        if f.name == "stages" and isinstance(obj, CoordinatorConfig) and (not v or not all(v)):
            raise ConfigError(f"{key}: needs at least one stage, each with at least one replica URL, got {list(v)!r}")
        if f.name == "cpu_cores" and v is not None:
            try:
                parse_cpu_list(v)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None


def _validate_speculative(obj: SpeculativeConfig, name: str, v, key: str) -> None:
    if name == "method" and v not in SPECULATIVE_METHODS:
        raise ConfigError(f"{key}: expected one of {', '.join(SPECULATIVE_METHODS)}, got {v!r}")
    if name == "method" and v == "draft" and not obj.draft_model:
        raise ConfigError(f"{key}: draft needs speculative.draft_model (a GGUF with the served model's vocabulary)")
    if name == "draft_threads" and v < 1:
        raise ConfigError(f"{key}: must be 1 or more, got {v}")
    if name == "max_tokens" and not 1 <= v <= MAX_DRAFT:
        raise ConfigError(f"{key}: must be between 1 and {MAX_DRAFT}, got {v}")
    if name == "min_tokens" and not 0 <= v <= MAX_DRAFT:
        raise ConfigError(f"{key}: must be between 0 and {MAX_DRAFT}, got {v}")
    if name == "ngram_min" and v < 1:
        raise ConfigError(f"{key}: must be 1 or more, got {v}")
    if name == "ngram_max" and v < obj.ngram_min:
        raise ConfigError(f"{key}: must be at least ngram_min ({obj.ngram_min}), got {v}")


def parse_cpu_list(spec: str) -> list[int]:
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]``."""
    cores: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"expected a core list like '0-15' or '0,2,4', got {spec!r}") from None
        if a < 0 or b < a:
            raise ValueError(f"bad core range {part!r} in {spec!r}")
        cores.extend(range(a, b + 1))
    if not cores:
        raise ValueError(f"empty core list {spec!r}")
    return sorted(set(cores))


def _apply_env(data: dict, cls, env: dict[str, str]) -> dict:
    data = dict(data)
    hints = typing.get_type_hints(cls)
    for name, value in env.items():
        if not name.startswith("CHATLOOP_"):
            continue
        path = name[len("CHATLOOP_") :].lower().split("__")
        if path[0] not in hints:
            continue  # not a config key (CHATLOOP_CACHE and friends)
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                break
        else:
            target[path[-1]] = yaml.safe_load(value) if value != "" else None
    return data


def load_config(
    cls: type[T],
    path: str | pathlib.Path | None = None,
    overrides: dict | None = None,
    env: dict[str, str] | None = None,
) -> T:
    """Build ``cls`` from a YAML file (optional), then ``CHATLOOP_*`` variables, then ``overrides`` (command-line
    flags: None values are ignored, a dict is merged into the section of that name)."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = pathlib.Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded or {}
    data = _apply_env(data, cls, dict(os.environ) if env is None else env)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            section = data.get(key) if isinstance(data.get(key), dict) else {}
            data[key] = {**section, **{k: v for k, v in value.items() if v is not None}}  # a section: merge
        elif value is not None:
            data[key] = value
    try:
        return _build(cls, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


KINDS = {"stage": StageConfig, "coordinator": CoordinatorConfig, "cluster": ClusterConfig}


def guess_kind(path: pathlib.Path) -> str:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    if isinstance(data, dict):
        if "weights_path" in data:
            return "stage"
        if "stages" in data and data["stages"] and isinstance(data["stages"][0], (list, str)):
            return "coordinator"
    return "cluster"


def add_parser(sub):
    p = sub.add_parser("config", help="check configuration files")
    p.add_argument("action", choices=["check"])
    p.add_argument("file", type=pathlib.Path)
    p.add_argument("--kind", choices=sorted(KINDS), help="default: guessed from the keys")

    def run(args) -> int:
        try:
            kind = args.kind or guess_kind(args.file)
            cfg = load_config(KINDS[kind], args.file)
        except ConfigError as exc:
            print(f"chatloop config: error: {exc}")
            return 2
        print(f"{args.file}: valid {kind} configuration")
        for f in dataclasses.fields(cfg):
            print(f"  {f.name}: {getattr(cfg, f.name)!r}")
        return 0

    return "config", run
