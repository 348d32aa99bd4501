"""Secure by default: no stage or coordinator on a non-loopback address without a cluster token."""

from __future__ import annotations

import subprocess

import pytest

from chatloop.bind_policy import insecure_bind_error, is_loopback
from chatloop.config import ClusterConfig, CoordinatorConfig, StageConfig, load_config
from tests.cluster_harness import chatloop_cmd
from tests.conftest import ROOT


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST", "::ffff:127.0.0.1"]
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    assert insecure_bind_error("stage", host, None, allow_insecure=False) is None


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "", "10.0.0.5", "192.168.1.2", "stage-0", "fe80::1", "localhost.evil"]
)
def test_other_hosts_need_a_token(host: str) -> None:
    assert not is_loopback(host)
    refusal = insecure_bind_error("stage", host, None, allow_insecure=False)
    assert refusal and "security.cluster_token" in refusal and "allow_insecure: true" in refusal
    assert repr(host) in refusal
    assert insecure_bind_error("stage", host, "s3cret", allow_insecure=False) is None
    assert insecure_bind_error("stage", host, None, allow_insecure=True) is None


@pytest.mark.parametrize("cls", [StageConfig, CoordinatorConfig, ClusterConfig])
def test_allow_insecure_is_a_config_key(cls) -> None:
    required = {StageConfig: {"weights_path": "x.gguf"}, CoordinatorConfig: {"stages": [["http://127.0.0.1:9000"]]}}
    cfg = load_config(cls, overrides=required.get(cls, {}), env={})
    assert cfg.allow_insecure is False
    cfg = load_config(cls, overrides=required.get(cls, {}), env={"CHATLOOP_ALLOW_INSECURE": "true"})
    assert cfg.allow_insecure is True
    with pytest.raises(ValueError, match="allow_insecure: expected true or false"):
        load_config(cls, overrides=required.get(cls, {}), env={"CHATLOOP_ALLOW_INSECURE": "maybe"})


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os  # noqa: PLC0415

    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("CHATLOOP_SECURITY") and k != "CHATLOOP_ALLOW_INSECURE"
    }
    return subprocess.run(
        chatloop_cmd(*args), cwd=ROOT, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def test_stage_on_all_interfaces_without_a_token_exits_2(stage_dir, tiny_llama_gguf) -> None:
    weights = stage_dir(tiny_llama_gguf) / "stage-0.gguf"
    r = _run(["stage", "--weights", str(weights), "--host", "0.0.0.0", "--port", "9"])
    assert r.returncode == 2, r.stderr
    assert "refusing to listen on '0.0.0.0'" in r.stderr
    assert "security.cluster_token" in r.stderr and "allow_insecure: true" in r.stderr


def test_coordinator_and_serve_on_all_interfaces_without_a_token_exit_2() -> None:
    r = _run(["coordinator", "--stage", "http://127.0.0.1:9", "--host", "0.0.0.0", "--port", "9"])
    assert r.returncode == 2 and "chatloop coordinator: error: refusing to listen on '0.0.0.0'" in r.stderr
    r = _run(["serve", "--host", "0.0.0.0", "--port", "9"])
    assert r.returncode == 2 and "chatloop serve: error: refusing to listen on '0.0.0.0'" in r.stderr
    assert "security.cluster_token" in r.stderr
