"""API keys, the cluster token between coordinator and stages, and CPU pinning, with real processes."""

from __future__ import annotations

import os

from chatloop.demo import demo_model_dir
from tests.cluster_harness import Cluster, http_json


def test_api_keys_and_cluster_token(procs, tmp_path):
    cluster = Cluster(
        procs,
        demo_model_dir(2),
        tmp_path,
        stage_extra={
            "security": {"cluster_token": "s3cret"},
            "performance": {"n_threads": 1, "kv_cache_mb": 128, "enable_cpu_pinning": True, "cpu_cores": "0"},
        },
        coordinator_extra={"security": {"cluster_token": "s3cret", "api_keys": ["key-a", "key-b"]}},
    ).start()
    body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
    status, out = http_json(f"{cluster.url}/v1/completions", body)
    assert status == 401 and out["error"]["type"] == "authentication_error"
    status, out = http_json(f"{cluster.url}/v1/completions", body, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, out = http_json(f"{cluster.url}/v1/completions", body, headers={"Authorization": "Bearer key-b"})
    assert status == 200, out
    assert http_json(f"{cluster.url}/healthz")[0] == 200  # probes stay open
    assert http_json(f"{cluster.url}/readyz")[0] == 200
    stage = cluster.stage_urls[0][0]
    assert http_json(f"{stage}/v1/info")[0] == 401
    status, info = http_json(f"{stage}/v1/info", headers={"X-ChatLoop-Token": "s3cret"})
    assert status == 200
    assert info["pinned_cores"] == [0] and info["threads"] == 1
    assert os.sched_getaffinity(info["pid"]) == {0}
    # Prometheus sends the token as a bearer token.
    assert http_json(f"{stage}/metrics", headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert http_json(f"{stage}/metrics", headers={"Authorization": "Bearer key-a"})[0] == 401


def test_empty_api_keys_from_the_environment_mean_an_open_api():
    from chatloop.config import CoordinatorConfig, load_config

    stages = {"stages": [["http://127.0.0.1:9000"]]}
    cfg = load_config(CoordinatorConfig, overrides=stages, env={"CHATLOOP_SECURITY__API_KEYS": ""})
    assert cfg.security.api_keys == ()
    cfg = load_config(CoordinatorConfig, overrides=stages, env={"CHATLOOP_SECURITY__API_KEYS": "a,b"})
    assert cfg.security.api_keys == ("a", "b")


def test_config_check_cli(tmp_path):
    import subprocess
    import sys

    good = tmp_path / "stage.yaml"
    good.write_text("weights_path: /models/x/stage-0.gguf\nbatching:\n  max_batch_size: 8\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("weights_path: /models/x/stage-0.gguf\nbatching:\n  max_batch_sise: 8\n")
    ok = subprocess.run(
        [sys.executable, "-m", "chatloop.cli", "config", "check", str(good)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    fail = subprocess.run(
        [sys.executable, "-m", "chatloop.cli", "config", "check", str(bad)], capture_output=True, text=True
    )
    assert fail.returncode == 2
    assert str(bad) in fail.stdout and "max_batch_sise" in fail.stdout
