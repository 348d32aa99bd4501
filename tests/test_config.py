"""Configuration loading: defaults, nested sections, errors that name the file and key, env overrides, core lists."""

from __future__ import annotations

import pytest
import yaml

from chatloop.config import (
    ClusterConfig,
    ConfigError,
    CoordinatorConfig,
    Observability,
    Performance,
    Security,
    StageBatching,
    StageConfig,
    guess_kind,
    load_config,
    parse_cpu_list,
)


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(cls, path, env=None, overrides=None, one_line: bool = True) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(cls, path, env=env or {}, overrides=overrides)
    message = str(err.value)
    if one_line:
        assert "\n" not in message
    return message


# -- defaults and sections ------------------------------------------------------------------------------------


def test_stage_defaults(tmp_path):
    cfg = load_config(StageConfig, write(tmp_path, "weights_path: /models/stage-0.gguf\n"), env={})
    assert cfg.weights_path == "/models/stage-0.gguf"
    assert cfg.port == 9000 and cfg.host == "127.0.0.1"
    # Sections left out are the sections' own defaults.
    assert cfg.batching == StageBatching()
    assert cfg.performance == Performance()
    assert cfg.observability == Observability()
    assert cfg.security == Security()
    assert cfg.performance.enable_cpu_pinning is False and cfg.performance.cpu_cores is None
    assert cfg.observability.log_level == "INFO"
    assert cfg.security.cluster_token is None


def test_stage_spec_keys_and_nested_sections(tmp_path):
    text = """
worker_id: stage-a
layer_group: 1
weights_path: /models/stage-1.gguf
port: 9101
batching:
  max_batch_size: 8
  batching_window_ms: 2
  max_queue_size: 100
performance:
  kv_cache_mb: 512
  enable_cpu_pinning: true
  cpu_cores: "0-3,8"
  numa_node: 0
observability:
  log_level: debug
"""
    cfg = load_config(StageConfig, write(tmp_path, text), env={})
    assert (cfg.worker_id, cfg.layer_group, cfg.port) == ("stage-a", 1, 9101)
    assert cfg.batching.max_batch_size == 8 and cfg.batching.max_queue_size == 100
    assert cfg.batching.batching_window_ms == 2.0 and isinstance(cfg.batching.batching_window_ms, float)
    assert cfg.performance.kv_cache_mb == 512
    assert cfg.performance.enable_cpu_pinning is True
    assert parse_cpu_list(cfg.performance.cpu_cores) == [0, 1, 2, 3, 8]
    assert cfg.performance.numa_node == 0
    # Sections not given keep their defaults.
    assert cfg.security.api_keys == ()


def test_coordinator_config(tmp_path):
    text = """
stages:
  - [http://10.0.0.1:9000, http://10.0.0.2:9000]
  - http://10.0.0.3:9000
health_check_interval_secs: 0.5
failure_threshold: 2
batching:
  max_batch_size: 4
"""
    cfg = load_config(CoordinatorConfig, write(tmp_path, text), env={})
    assert cfg.stages == (("http://10.0.0.1:9000", "http://10.0.0.2:9000"), ("http://10.0.0.3:9000",))
    assert cfg.health_check_interval_secs == 0.5
    assert cfg.failure_threshold == 2
    assert cfg.recovery_threshold == 2  # default
    assert cfg.topology == "chain" and cfg.prefix_cache_exact  # defaults: stage to stage, a bit-exact prefix cache
    assert cfg.batching.max_batch_size == 4
    assert cfg.batching.prefill_chunk_tokens == 256  # default


def test_coordinator_needs_stages(tmp_path):
    message = load_error(CoordinatorConfig, write(tmp_path, "port: 8001\n"))
    assert "stages" in message and "missing" in message


def test_cluster_config(tmp_path):
    text = """
model_dir: /models/smol
port: 8080
stage_defaults:
  max_batch_size: 8
stages:
  - replicas: 2
    cpu_cores: "0-1"
  - n_threads: 2
coordinator:
  failure_threshold: 5
"""
    cfg = load_config(ClusterConfig, write(tmp_path, text), env={})
    assert cfg.model_dir == "/models/smol" and cfg.port == 8080
    assert cfg.stage_defaults.max_batch_size == 8
    assert [s.replicas for s in cfg.stages] == [2, 1]
    assert cfg.stages[0].cpu_cores == "0-1" and cfg.stages[1].n_threads == 2
    assert cfg.coordinator == {"failure_threshold": 5}
    assert load_config(ClusterConfig, None, env={}).model_dir is None  # every key has a default


def test_empty_file_means_defaults(tmp_path):
    assert load_config(ClusterConfig, write(tmp_path, ""), env={}) == load_config(ClusterConfig, None, env={})


def test_configs_are_frozen(tmp_path):
    cfg = load_config(ClusterConfig, None, env={})
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]


# -- errors ---------------------------------------------------------------------------------------------------


def test_unknown_top_level_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "weights_path: /x.gguf\nmax_batch_sise: 4\n", name="stage-a.yaml")
    message = load_error(StageConfig, path)
    assert str(path) in message
    assert "'max_batch_sise'" in message
    assert "known keys" in message


def test_unknown_nested_key_names_file_section_and_key(tmp_path):
    path = write(tmp_path, "weights_path: /x.gguf\nbatching:\n  window_ms: 3\n", name="stage-b.yaml")
    message = load_error(StageConfig, path)
    assert str(path) in message and "batching" in message and "'window_ms'" in message
    assert "batching_window_ms" in message  # the known keys of the section are listed


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("port: eighty\n", "port", "whole number"),
        ("port: 8.5\n", "port", "whole number"),
        ("port: 70000\n", "port", "port number"),
        ("port: 0\n", "port", "greater than 0"),
        ("verify_sha256: 'yes'\n", "verify_sha256", "true or false"),
        ("batching:\n  max_batch_size: eight\n", "batching.max_batch_size", "whole number"),
        ("batching:\n  max_batch_size: 0\n", "batching.max_batch_size", "greater than 0"),
        ("batching:\n  batching_window_ms: -1\n", "batching.batching_window_ms", "0 or more"),
        ("batching:\n  prompt_part_rows: 100\n", "batching.prompt_part_rows", "multiple of 64"),
        ("batching:\n  prompt_part_rows: -64\n", "batching.prompt_part_rows", "0 or more"),
        ("batching:\n  max_batch_size: true\n", "batching.max_batch_size", "whole number"),
        ("batching: 5\n", "batching", "mapping"),
        ("performance:\n  cpu_cores: 3-1\n", "performance.cpu_cores", "core range"),
        ("performance:\n  enable_cpu_pinning: 1\n", "performance.enable_cpu_pinning", "true or false"),
        ("observability:\n  log_level: LOUD\n", "observability.log_level", "DEBUG"),
        ("observability:\n  log_format: xml\n", "observability.log_format", "json or text"),
    ],
)
def test_bad_values_name_file_key_and_expectation(tmp_path, text, key, expected):
    path = write(tmp_path, "weights_path: /x.gguf\n" + text)
    message = load_error(StageConfig, path)
    assert str(path) in message
    assert key in message
    assert expected in message


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "port: 9000\n")
    message = load_error(StageConfig, path)
    assert str(path) in message and "weights_path" in message and "missing" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("- a\n- b\n", "mapping"), ("weights_path: [unclosed\n", "YAML"), ("just a string\n", "mapping")],
)
def test_not_a_mapping_or_not_yaml(tmp_path, text, expected):
    path = write(tmp_path, text)
    # PyYAML's own message (line, column and a caret) spans several lines; it is quoted as it is.
    message = load_error(StageConfig, path, one_line=expected != "YAML")
    assert str(path) in message and expected in message


def test_unreadable_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = load_error(StageConfig, path)
    assert str(path) in message and "cannot read" in message


# -- environment and overrides ---------------------------------------------------------------------------------


def test_env_overrides_nested_and_top_level_keys(tmp_path):
    path = write(tmp_path, "weights_path: /x.gguf\nport: 9000\nbatching:\n  max_batch_size: 16\n")
    env = {
        "CHATLOOP_BATCHING__MAX_BATCH_SIZE": "8",
        "CHATLOOP_PORT": "9100",
        "CHATLOOP_PERFORMANCE__ENABLE_CPU_PINNING": "true",
        "CHATLOOP_OBSERVABILITY__LOG_LEVEL": "WARNING",
        "CHATLOOP_CACHE": "/tmp/elsewhere",  # not a config key: ignored
        "OTHER_PORT": "1",
    }
    cfg = load_config(StageConfig, path, env=env)
    assert cfg.batching.max_batch_size == 8
    assert cfg.batching.max_queue_size == 64  # the rest of the section is kept
    assert cfg.port == 9100
    assert cfg.performance.enable_cpu_pinning is True
    assert cfg.observability.log_level == "WARNING"


def test_env_override_from_the_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATLOOP_BATCHING__MAX_BATCH_SIZE", "3")
    cfg = load_config(StageConfig, write(tmp_path, "weights_path: /x.gguf\n"))
    assert cfg.batching.max_batch_size == 3


def test_env_override_is_validated(tmp_path):
    path = write(tmp_path, "weights_path: /x.gguf\n")
    message = load_error(StageConfig, path, env={"CHATLOOP_BATCHING__MAX_BATCH_SIZE": "many"})
    assert "batching.max_batch_size" in message and "whole number" in message


def test_explicit_overrides_win_over_file_and_env(tmp_path):
    path = write(tmp_path, "weights_path: /x.gguf\nport: 9000\n")
    cfg = load_config(StageConfig, path, env={"CHATLOOP_PORT": "9100"}, overrides={"port": 9200, "host": None})
    assert cfg.port == 9200
    assert cfg.host == "127.0.0.1"  # a None override means "not given"


# -- helpers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "cores"),
    [
        ("0-3", [0, 1, 2, 3]),
        ("0,2,4", [0, 2, 4]),
        ("0-1,8-9", [0, 1, 8, 9]),
        (" 3 , 1-2 ", [1, 2, 3]),
        ("2,2,1-2", [1, 2]),
        ("7", [7]),
    ],
)
def test_parse_cpu_list(spec, cores):
    assert parse_cpu_list(spec) == cores


@pytest.mark.parametrize("spec", ["", ",", "a-b", "3-1", "-1", "1-", "0-3,x"])
def test_parse_cpu_list_rejects(spec):
    with pytest.raises(ValueError):
        parse_cpu_list(spec)


def test_guess_kind(tmp_path):
    assert guess_kind(write(tmp_path, "weights_path: /x.gguf\n", "a.yaml")) == "stage"
    assert guess_kind(write(tmp_path, "stages:\n  - http://a:9000\n", "b.yaml")) == "coordinator"
    assert guess_kind(write(tmp_path, "stages:\n  - replicas: 2\n", "c.yaml")) == "cluster"
    assert guess_kind(write(tmp_path, "model_dir: /m\n", "d.yaml")) == "cluster"


def test_section_overrides_merge_into_the_file(tmp_path):
    """Command-line flags for nested keys (``--threads``, ``--cluster-token``) keep the file's other keys."""
    path = tmp_path / "stage.yaml"
    path.write_text("weights_path: /m/stage-0.gguf\nperformance:\n  kv_cache_mb: 128\n  n_threads: 4\n")
    cfg = load_config(StageConfig, path, env={}, overrides={"performance": {"n_threads": 1, "cpu_cores": None}})
    assert cfg.performance.kv_cache_mb == 128 and cfg.performance.n_threads == 1
    cfg = load_config(StageConfig, path, env={}, overrides={"security": {"cluster_token": "t"}})
    assert cfg.security.cluster_token == "t" and cfg.performance.n_threads == 4


@pytest.mark.parametrize("stages", [None, [], [["http://127.0.0.1:9000"], []]])
def test_coordinator_needs_a_replica_for_every_stage(tmp_path, stages):
    path = tmp_path / "coordinator.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    msg = load_error(CoordinatorConfig, path)
    assert "stages" in msg and "at least one" in msg, msg
