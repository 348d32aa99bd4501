"""Static checks of configs/: the example YAMLs load and document every key with its real default, the
Grafana dashboard plots exactly the spec's metrics, the Prometheus configuration targets the compose services."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import typing

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chatloop.config import load_config
from chatloop.coordinator.metrics import CoordinatorMetrics
from chatloop.stage.metrics import StageMetrics
from tests.deploy_files import CONFIGS, DOCKER, ROOT, _dataclass_of, compose_doc, config_class

# Metric names of the original spec (issue 7): the only ones the dashboard may use.
SPEC_METRICS = {
    "worker_forward_duration_seconds",
    "worker_queue_time_seconds",
    "worker_queue_depth",
    "worker_batch_size",
    "worker_cpu_utilization_percent",
    "worker_memory_used_bytes",
    "coordinator_requests_routed_total",
    "coordinator_active_workers",
    "coordinator_unhealthy_workers",
    "coordinator_worker_response_time_seconds",
    "inference_requests_total",
    "inference_request_duration_seconds",
    "inference_tokens_generated_total",
    "inference_tokens_per_second",
    "inference_time_to_first_token_seconds",
    "inference_inter_token_latency_seconds",
    "inference_prompt_tokens_total",
}
SPEC_LABELS = {"stage", "worker", "model", "status"}


# -- configuration examples ------------------------------------------------------------------------------

CONFIG_FILES = sorted(CONFIGS.glob("*.yaml")) + sorted((DOCKER / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_files_load(path: pathlib.Path) -> None:
    cfg = load_config(config_class(path), path, env={})
    assert dataclasses.is_dataclass(cfg)


def test_example_configs_cover_every_kind() -> None:
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {"stage.yaml", "coordinator.yaml", "cluster.yaml"}


_KEY_LINE = re.compile(r"^(\s*)(-\s+)?([A-Za-z_][A-Za-z0-9_]*):(?:\s|$)(.*)$")
_DEFAULT = re.compile(r"\bDefault\s+(\"[^\"]*\"|\[\]|\{\}|\d+\.\d+\.\d+\.\d+|[-+]?\d+(?:\.\d+)?|[A-Za-z_]+)")


def documented_keys(path: pathlib.Path) -> dict[tuple[str, ...], str]:
    """Key path -> the comment documenting it (the comment lines right above the key plus its inline comment).

    Keys of later items of a list are skipped: the first item documents them."""
    out: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        if re.match(r"^-\s+#", stripped):
            pending = [stripped.split("#", 1)[1].strip()]
            continue
        m = _KEY_LINE.match(line)
        if not m:
            pending = []
            continue
        indent = len(m.group(1)) + (len(m.group(2)) if m.group(2) else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key_path = (*[k for _, k in stack], m.group(3))
        stack.append((indent, m.group(3)))
        inline = m.group(4).split(" #", 1)[1].strip() if " #" in m.group(4) else ""
        if key_path not in out:
            out[key_path] = " ".join([*pending, inline]).strip()
        pending = []
    return out


def _leaf_paths(cls: type, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], dataclasses.Field]:
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        inner = _dataclass_of(hints[f.name])
        if inner is None or typing.get_origin(hints[f.name]) is tuple:
            out[path] = f
        if inner is not None:
            out.update(_leaf_paths(inner, path))
    return out


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", ["stage.yaml", "coordinator.yaml", "cluster.yaml"])
def test_example_configs_document_every_key(name: str) -> None:
    """Every key appears, with a comment giving its meaning and default, and the default is the real one."""
    path = CONFIGS / name
    cls = config_class(path)
    docs = documented_keys(path)
    leaves = _leaf_paths(cls)
    missing = sorted(".".join(p) for p in leaves if p not in docs)
    assert not missing, f"{name}: keys not shown: {missing}"
    for key_path, f in leaves.items():
        doc = docs[key_path]
        where = f"{name}: {'.'.join(key_path)}"
        default = _default_of(f)
        if default is dataclasses.MISSING:
            assert "required" in doc.lower(), f"{where}: a required key must say so ({doc!r})"
            continue
        m = _DEFAULT.search(doc)
        assert m, f"{where}: the comment must give the default as 'Default <value>' ({doc!r})"
        assert len(doc.split()) >= 4, f"{where}: the comment must say what the key means ({doc!r})"
        stated = yaml.safe_load(m.group(1))
        assert stated == default, f"{where}: the comment says default {stated!r}, the code has {default!r}"


# -- Grafana ---------------------------------------------------------------------------------------------

PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "by", "without",
    "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "topk", "bottomk",
    "quantile", "clamp_min", "clamp_max", "abs", "delta", "deriv", "avg_over_time", "max_over_time",
    "min_over_time", "sum_over_time", "label_values", "vector", "scalar", "time", "absent",
}  # fmt: skip


def exposed_series() -> dict[str, str]:
    """Series name -> its metric as the spec names it (counters with _total), for everything the coordinator and a
    stage expose."""
    out = {}
    registries = [CoordinatorMetrics("m").registry, StageMetrics("0", "stage-0").registry]
    for registry in registries:
        for fam in text_string_to_metric_families(generate_latest(registry).decode()):
            if fam.type == "counter":
                out[f"{fam.name}_total"] = f"{fam.name}_total"
            elif fam.type == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    out[fam.name + suffix] = fam.name
            else:
                out[fam.name] = fam.name
    return out


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(series names, label names) an expression uses."""
    labels: set[str] = set()
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)

    def selector(m: re.Match) -> str:
        labels.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(0)))
        return " "

    expr = re.sub(r"\{[^}]*\}", selector, expr)

    def grouping(m: re.Match) -> str:
        labels.update(x.strip() for x in m.group(2).split(",") if x.strip())
        return " "

    expr = re.sub(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)", grouping, expr)
    words = set(re.findall(r"(?<![\w$.])[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return words - PROMQL_WORDS, labels


def grafana_exprs(dash: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query)))
    return out


def test_grafana_dashboard() -> None:
    dash = json.loads((CONFIGS / "grafana-dashboard.json").read_text())
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    series = exposed_series()
    missing = SPEC_METRICS - set(series.values())
    assert not missing, f"metrics of the spec that neither the coordinator nor a stage exposes: {sorted(missing)}"
    spec_series = {s for s, family in series.items() if family in SPEC_METRICS}
    used_families = set()
    for title, expr in grafana_exprs(dash):
        names, labels = promql_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - spec_series
        assert not unknown, f"{title}: {sorted(unknown)} are not metrics of the spec (as exposed) in {expr!r}"
        assert labels <= SPEC_LABELS | {"le", "component"}, f"{title}: labels {sorted(labels - SPEC_LABELS)}"
        used_families |= {series[n] for n in names}
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"\bby\s*\([^)]*\ble\b", expr), f"{title}: quantile needs le"
    assert used_families == SPEC_METRICS, f"metrics without a panel: {sorted(SPEC_METRICS - used_families)}"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("request rate", "p95", "tokens/s", "first token", "inter-token", "queue depth", "batch size",
                   "unhealthy", "cpu", "memory"):  # fmt: skip
        assert needed in titles, f"the dashboard has no panel about {needed!r}"


def test_grafana_check_catches_foreign_metrics() -> None:
    names, labels = promql_names('sum by (le, pod) (rate(vllm:e2e_request_latency_seconds_bucket{model="x"}[5m]))')
    assert names == {"vllm:e2e_request_latency_seconds_bucket"} and labels == {"le", "pod", "model"}


# -- Prometheus ------------------------------------------------------------------------------------------


def test_prometheus_config_targets_compose_services() -> None:
    cfg = yaml.safe_load((CONFIGS / "prometheus.yml").read_text())
    services = compose_doc()["services"]
    targets = {t for job in cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in services, f"{target}: no compose service {host}"
        assert port in {*map(str, services[host].get("expose", [])), "8000"}
    assert {t.split(":")[0] for t in targets} == {"coordinator", "stage-0", "stage-1"}


def test_promtool_check_config() -> None:
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "config", str(CONFIGS / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
