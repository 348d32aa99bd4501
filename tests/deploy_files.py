"""Where the deployment files are and how the deployment tests read them (test_deploy, test_config_examples)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import types
import typing

import jsonschema
import yaml

from chatloop.config import ClusterConfig, CoordinatorConfig, StageConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
CONFIGS = ROOT / "configs"
SCHEMAS = pathlib.Path(__file__).resolve().parent / "schemas"
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def config_class(path: pathlib.Path) -> type:
    name = path.name
    if name.startswith("stage"):
        return StageConfig
    if name.startswith("coordinator"):
        return CoordinatorConfig
    if name.startswith("cluster"):
        return ClusterConfig
    raise AssertionError(f"{path}: cannot tell which configuration this is from its name")


def _dataclass_of(tp) -> type | None:
    """The dataclass a field holds (directly, optionally, or as the items of a tuple), or None for a leaf."""
    if dataclasses.is_dataclass(tp):
        return tp
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, tuple):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def load_schema(name: str) -> dict:
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def compose_doc(variables: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), variables)


def interpolate(value, variables: dict[str, str] | None = None):
    """Compose-style ``${VAR:-default}`` substitution with the given variables (else the defaults)."""
    variables = variables or {}
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: variables.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    return value
