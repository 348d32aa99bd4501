"""A real Prometheus scrapes a running ChatLoop: targets up, token counts queryable, expositions lint-clean.

Starts ``chatloop serve`` on the demo model (SmolLM2-135M, 2 stages) and the ``prometheus`` server on
loopback, scraping the coordinator and every stage once a second. It installs nothing: without the
``prometheus`` and ``promtool`` binaries (Debian: ``apt-get install prometheus``) it is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.cluster_harness import chatloop_cmd, free_port, http_json, log_tail, wait_until

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (PROMETHEUS and PROMTOOL),
        reason="the prometheus and promtool binaries are not installed (Debian: apt-get install prometheus)",
    ),
]


def get_text(url: str, timeout: float = 60.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def prom_query(base: str, query: str) -> list[dict]:
    """The result vector of an instant PromQL query."""
    status, body = http_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}")
    assert status == 200 and body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def served(spawn):
    """``chatloop serve`` of the demo model: (coordinator URL, stage URLs)."""
    port = free_port()
    proc = spawn(chatloop_cmd("serve", "--port", str(port), "--threads", "1"), name="serve")
    url = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"chatloop serve exited with {proc.returncode}:\n{log_tail(proc)}")
        status, _ = http_json(f"{url}/readyz", timeout=2)
        return status == 200

    # NOTE: the first run downloads the demo model from PyPI and converts it; later runs take seconds.
    wait_until(ready, timeout=600, interval=0.5, what="chatloop serve ready")
    status, cluster = http_json(f"{url}/v1/cluster", timeout=10)
    assert status == 200, cluster
    stages = [r["url"] for r in sorted(cluster["replicas"], key=lambda r: r["stage"])]
    assert len(stages) >= 2, cluster
    return url, stages


@pytest.fixture
def prometheus(spawn, tmp_path, served):
    """A Prometheus server on loopback scraping the coordinator and every stage every second: its base URL."""
    url, stages = served
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "chatloop-coordinator", "static_configs": [{"targets": [url.removeprefix("http://")]}]},
            {
                "job_name": "chatloop-stages",
                "static_configs": [{"targets": [s.removeprefix("http://") for s in stages]}],
            },
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    check = subprocess.run([PROMTOOL, "check", "config", str(config_path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    proc = spawn(
        [
            PROMETHEUS,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        name="prometheus",
    )
    base = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log_tail(proc)}")
        try:
            return get_text(f"{base}/-/ready", timeout=2) is not None
        except (urllib.error.URLError, OSError):
            return False

    wait_until(ready, timeout=120, interval=0.2, what="prometheus ready")
    return base


@pytest.mark.timeout(900)
def test_prometheus_scrapes_chatloop(served, prometheus) -> None:
    url, stages = served
    # Every target is up.
    expected = {u.removeprefix("http://") for u in [url, *stages]}

    def targets_up():
        status, body = http_json(f"{prometheus}/api/v1/targets?state=active", timeout=5)
        active = body["data"]["activeTargets"] if status == 200 else []
        health = {t["labels"]["instance"]: t["health"] for t in active}
        return health if set(health) == expected and all(h == "up" for h in health.values()) else None

    health = wait_until(targets_up, timeout=120, interval=0.5, what="every target up")
    assert len(health) == len(stages) + 1

    def up_series():
        # NOTE: polled too: a scrape that missed its 1 s timeout on a busy machine reads 0 until the next one.
        return {r["metric"]["instance"] for r in prom_query(prometheus, "up") if r["value"][1] == "1"} == expected

    wait_until(up_series, timeout=120, interval=0.5, what="up == 1 for every target")

    # A completion; Prometheus then reports the number of tokens it generated.
    before = sum(float(r["value"][1]) for r in prom_query(prometheus, "inference_tokens_generated_total"))
    status, body = http_json(
        f"{url}/v1/completions",
        {"prompt": "The three primary colours are", "max_tokens": 12, "temperature": 0},
        timeout=120,
    )
    assert status == 200, body
    generated = body["usage"]["completion_tokens"]
    assert generated > 0

    def counted():
        result = prom_query(prometheus, "sum(inference_tokens_generated_total)")
        value = float(result[0]["value"][1]) if result else 0.0
        return value if value - before == generated else None

    try:
        wait_until(counted, timeout=120, interval=0.5, what="the generated tokens in Prometheus")
    except TimeoutError:
        result = prom_query(prometheus, "sum(inference_tokens_generated_total)")
        pytest.fail(f"Prometheus reports {result} generated tokens (before: {before}); the request made {generated}")
    (series,) = prom_query(prometheus, "inference_tokens_generated_total")
    assert series["metric"]["job"] == "chatloop-coordinator" and series["metric"].get("model")
    requests = prom_query(prometheus, "sum(inference_requests_total)")
    assert requests and float(requests[0]["value"][1]) >= 1

    # Every stage ran forward passes for it, and says so under its stage label.
    def forwards_by_stage():
        result = prom_query(prometheus, "sum by (stage) (worker_forward_duration_seconds_count)")
        by_stage = {r["metric"]["stage"]: float(r["value"][1]) for r in result}
        return by_stage if len(by_stage) == len(stages) and all(v > 0 for v in by_stage.values()) else None

    by_stage = wait_until(forwards_by_stage, timeout=120, interval=0.5, what="forward counts of every stage")
    assert set(by_stage) == {str(k) for k in range(len(stages))}


@pytest.mark.timeout(900)
def test_promtool_check_metrics(served) -> None:
    """Each process's /metrics passes promtool's exposition lint, before and after serving a request."""
    url, stages = served
    status, body = http_json(f"{url}/v1/completions", {"prompt": "Hello", "max_tokens": 4}, timeout=120)
    assert status == 200, body
    for target in [url, *stages]:
        text = get_text(f"{target}/metrics")
        assert "# TYPE" in text
        result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{target}/metrics:\n{result.stdout}{result.stderr}"
    coordinator = get_text(f"{url}/metrics")
    for name in ("inference_tokens_generated_total", "inference_requests_total", "coordinator_active_workers"):
        assert name in coordinator
    stage = get_text(f"{stages[0]}/metrics")
    for name in ("worker_forward_duration_seconds_bucket", "worker_queue_depth", "worker_memory_used_bytes"):
        assert name in stage
