"""``/openapi.json``: valid OpenAPI 3.1, the same routes as the app, and schemathesis against a live coordinator."""

from __future__ import annotations

import os

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from schemathesis.specs.openapi.definitions import OPENAPI_31

from chatloop.config import CoordinatorConfig, load_config
from chatloop.coordinator import api_schema
from chatloop.coordinator.app import create_app
from chatloop.coordinator.openapi import openapi_document
from chatloop.demo import demo_model_dir
from tests.cluster_harness import Cluster, http_json, wait_until

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# More for a deeper local run: CHATLOOP_SCHEMATHESIS_EXAMPLES=500.
EXAMPLES_PER_OPERATION = int(os.environ.get("CHATLOOP_SCHEMATHESIS_EXAMPLES", "30"))
MAX_TOKENS = 3  # generated requests run on the real model: keep each one short


def _schemas(node):
    """Every JSON Schema embedded in the document (request bodies, responses, components)."""
    if isinstance(node, dict):
        if isinstance(node.get("schema"), dict):
            yield node["schema"]
        for key, value in node.items():
            if key == "schemas" and isinstance(value, dict):
                yield from value.values()
            else:
                yield from _schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _schemas(value)


def test_document_is_valid_openapi_31():
    doc = openapi_document("some-model")
    jsonschema.Draft202012Validator(OPENAPI_31).validate(doc)
    found = list(_schemas(doc))
    assert len(found) > 10
    for schema in found:
        jsonschema.Draft202012Validator.check_schema(schema)


def test_document_matches_the_app_routes():
    cfg = load_config(CoordinatorConfig, overrides={"stages": [["http://127.0.0.1:9"]]})
    app = create_app(cfg)
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()}
    # aiohttp answers HEAD for every GET route; the document lists the GETs.
    heads = {(path, "get") for path, method in routes if method == "head"}
    routes -= {(path, "head") for path, _ in heads}
    assert heads <= routes
    doc = openapi_document("some-model")
    documented = {(path, m) for path, item in doc["paths"].items() for m in item if m in METHODS}
    assert routes == documented, f"only in the app: {routes - documented}; only documented: {documented - routes}"


def test_document_states_the_validation_limits():
    doc = openapi_document("m")
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = body["properties"]
    assert props["stop"]["oneOf"][1]["maxItems"] == api_schema.MAX_STOP_STRINGS
    assert props["stop"]["oneOf"][1]["items"]["maxLength"] == api_schema.MAX_STOP_CHARS
    assert props["logit_bias"]["maxProperties"] == api_schema.MAX_LOGIT_BIAS
    assert props["messages"]["maxItems"] == api_schema.MAX_MESSAGES
    assert props["messages"]["items"]["properties"]["role"]["enum"] == list(api_schema.ROLES)
    assert "Unknown request fields are ignored" in doc["info"]["description"]


# -- schemathesis against a live coordinator ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(module_procs, tmp_path_factory):
    extra = {"max_tokens_default": MAX_TOKENS, "max_prompt_bytes": 4000}
    return Cluster(module_procs, demo_model_dir(2), tmp_path_factory.mktemp("openapi"), coordinator_extra=extra).start()


def _short(case) -> None:
    """Cap generation so that a valid request costs a few decode steps."""
    if isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and not isinstance(case.body.get(key), bool):
                case.body[key] = min(case.body[key], MAX_TOKENS)


def _fuzz(op, mode: GenerationMode, base_url: str, seen: dict[str, set[int]], accepted: list) -> None:
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(op.as_strategy(generation_mode=mode))
    def run(case):
        if mode is GenerationMode.POSITIVE:
            _short(case)  # (a negative case must stay as generated: its max_tokens may be what is wrong)
        response = case.call(base_url=base_url, timeout=60)
        seen.setdefault(op.label, set()).add(response.status_code)
        if mode is GenerationMode.NEGATIVE and response.status_code == 200:
            what = getattr(getattr(getattr(case.meta, "phase", None), "data", None), "description", "")
            accepted.append((op.label, what, case.body))
        # 503 is "not ready / busy", a documented answer; any other 5xx is a server error.
        if response.status_code != 503:
            checks = [not_a_server_error]
            if mode is GenerationMode.POSITIVE:
                checks += [content_type_conformance, response_schema_conformance]
            case.validate_response(response, checks=checks)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_schemathesis_finds_no_server_error(cluster, mode):
    schema = schemathesis.openapi.from_url(f"{cluster.url}/openapi.json")
    seen: dict[str, set[int]] = {}
    accepted: list = []
    for result in schema.get_all_operations():
        op = result.ok()
        if mode is GenerationMode.NEGATIVE and op.method.lower() == "get":
            continue  # GET operations take no input to break
        _fuzz(op, mode, cluster.url, seen, accepted)
    # Loaded from a URL, schemathesis leaves out the document's own path: all operations but one.
    n_ops = sum(1 for item in openapi_document("m")["paths"].values() for m in item if m in METHODS)
    assert len(seen) == (n_ops - 1 if mode is GenerationMode.POSITIVE else 3), " ".join(sorted(seen))
    # Every body that breaks the documented schema is refused: the document is no looser than the server.
    assert not accepted, accepted
    wait_until(lambda: cluster.live_sequences() == [0, 0], what="every sequence freed")
    assert http_json(f"{cluster.url}/healthz")[0] == 200
