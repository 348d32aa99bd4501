"""Which JSON Schema a request may constrain output with: what llama-cpp-python's converter enforces.

``llama_cpp.llama_grammar.SchemaConverter`` (a port of llama.cpp's json_schema_to_grammar.py) turns a schema
into GBNF. Read from its ``visit`` (llama-cpp-python 0.3.36), it enforces: ``type`` (one or a list), ``properties``,
``required``, ``additionalProperties``, ``items`` (a schema, or a list for tuples), ``prefixItems``,
``minItems``/``maxItems``, ``enum``, ``const``, ``anyOf``, ``oneOf`` (as anyOf: exclusivity is not enforced),
``allOf`` of object schemas, local ``$ref`` with ``$defs``/``definitions``, ``pattern``, ``minLength``/
``maxLength`` and the formats ``date``, ``time``, ``date-time`` and ``uuid``. Everything else it ignores without
a word (numeric bounds, ``patternProperties``, ``not``, ``if``/``then``, ``uniqueItems``, other formats ...),
and so would the output: this check refuses those, and the combinations where the converter drops a keyword
(constraints beside ``$ref``, ``anyOf`` or a list of types), each with the path of the offending keyword.
"""

from __future__ import annotations

import re

# Keywords that describe without constraining: always allowed, never enforced.
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly"}
)
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
SUPPORTED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "format",
        "minLength",
        "maxLength",
    }
)
# NOTE: the converter writes {m,n} repetitions out rule by rule, and llama.cpp refuses more than 2000 repetitions.
MAX_REPEAT = 1000
MAX_DEPTH = 32
MAX_NODES = 5000
_DEFS = ("$defs", "definitions")


class SchemaError(ValueError):
    """An unsupported or malformed schema; ``path`` names the offending keyword (dotted, from the schema root)."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class _Checker:
    def __init__(self, root: dict) -> None:
        self.root = root
        self.nodes = 0

    def fail(self, path: str, message: str):
        raise SchemaError(message, path)

    def schema(self, node, path: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self.fail(path, f"the schema has more than {MAX_NODES} subschemas")
        if depth > MAX_DEPTH:
            self.fail(path, f"the schema nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, bool):
            self.fail(path, "boolean schemas are supported only as 'additionalProperties'")
        if not isinstance(node, dict):
            self.fail(path, "a schema must be an object")
        for key in node:
            if not isinstance(key, str) or (key not in SUPPORTED and key not in ANNOTATIONS):
                self.fail(f"{path}.{key}", f"the JSON Schema keyword '{key}' is not supported for constrained output")
        constraints = {k for k in node if k in SUPPORTED and k not in _DEFS}
        for defs in _DEFS:
            if defs in node:
                if not isinstance(node[defs], dict):
                    self.fail(f"{path}.{defs}", f"'{defs}' must be an object of schemas")
                for name, sub in node[defs].items():
                    self.schema(sub, f"{path}.{defs}.{name}", depth + 1)
        if "$ref" in node:
            self._ref(node["$ref"], f"{path}.$ref")
            self._alone(node, "$ref", constraints, path)
            return
        for union in ("anyOf", "oneOf"):
            if union in node:
                self._alone(node, union, constraints, path)
                self._list_of_schemas(node[union], f"{path}.{union}", depth)
                return
        self._type(node, path, constraints)
        if "const" in node or "enum" in node:
            if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
                self.fail(f"{path}.enum", "'enum' must be a non-empty list")
            return  # the converter writes the listed values; other keywords cannot loosen that
        if "allOf" in node:
            self._all_of(node, path, depth)
        self._object(node, path, depth)
        self._array(node, path, depth)
        self._string(node, path)

    def _alone(self, node: dict, key: str, constraints: set[str], path: str) -> None:
        others = sorted(constraints - {key})
        if others:
            self.fail(f"{path}.{others[0]}", f"'{others[0]}' beside '{key}' would not be enforced; move it inside")

    def _list_of_schemas(self, items, path: str, depth: int) -> None:
        if not isinstance(items, list) or not items:
            self.fail(path, "must be a non-empty list of schemas")
        for i, sub in enumerate(items):
            self.schema(sub, f"{path}[{i}]", depth + 1)

    def _ref(self, ref, path: str) -> None:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            self.fail(path, "only local references ('#/$defs/Name') are supported")
        target = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                self.fail(path, f"the reference {ref[:100]!r} does not resolve in this schema")
            target = target[part]

    def _type(self, node: dict, path: str, constraints: set[str]) -> None:
        t = node.get("type")
        if t is None or (isinstance(t, str) and t in TYPES):
            return
        if isinstance(t, list) and t and all(isinstance(x, str) and x in TYPES for x in t) and len(set(t)) == len(t):
            others = sorted(constraints - {"type"})
            if others:
                self.fail(
                    f"{path}.{others[0]}", f"'{others[0]}' beside a list of types would not be enforced; use anyOf"
                )
            return
        self.fail(f"{path}.type", f"'type' must be one of {', '.join(TYPES)} or a list of them")

    def _count(self, node: dict, path: str, lo_key: str, hi_key: str) -> None:
        for key in (lo_key, hi_key):
            v = node.get(key)
            if key in node and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_REPEAT):
                self.fail(f"{path}.{key}", f"'{key}' must be an integer between 0 and {MAX_REPEAT}")
        if hi_key in node and node.get(lo_key, 0) > node[hi_key]:
            self.fail(f"{path}.{lo_key}", f"'{lo_key}' is larger than '{hi_key}'")

    def _object(self, node: dict, path: str, depth: int) -> None:
        props = node.get("properties", {})
        if not isinstance(props, dict):
            self.fail(f"{path}.properties", "'properties' must be an object of schemas")
        for name, sub in props.items():
            self.schema(sub, f"{path}.properties.{name}", depth + 1)
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            self.fail(f"{path}.required", "'required' must be a list of property names")
        missing = [r for r in required if r not in props]
        if missing:
            self.fail(f"{path}.required", f"required property '{missing[0]}' is not among 'properties'")
        if "additionalProperties" in node:
            extra = node["additionalProperties"]
            if not isinstance(extra, bool):
                self.schema(extra, f"{path}.additionalProperties", depth + 1)

    def _all_of(self, node: dict, path: str, depth: int) -> None:
        if "properties" in node or node.get("type") not in (None, "object"):
            self.fail(f"{path}.allOf", "'allOf' is supported only to merge object schemas, without own properties")
        parts = node["allOf"]
        self._list_of_schemas(parts, f"{path}.allOf", depth)
        for i, part in enumerate(parts):
            options = part.get("anyOf", [part])
            for sub in options:
                if not ("properties" in sub or "$ref" in sub):
                    self.fail(f"{path}.allOf[{i}]", "each 'allOf' part must be an object schema with 'properties'")

    def _array(self, node: dict, path: str, depth: int) -> None:
        items, prefix = node.get("items"), node.get("prefixItems")
        if prefix is not None:
            self._list_of_schemas(prefix, f"{path}.prefixItems", depth)
            if items not in (None, False):
                self.fail(f"{path}.items", "'items' beside 'prefixItems' is supported only as false")
        if isinstance(items, list):
            self._list_of_schemas(items, f"{path}.items", depth)
        elif items is not None and not (items is False and prefix is not None):
            self.schema(items, f"{path}.items", depth + 1)
        tuple_form = prefix is not None or isinstance(items, list)
        if tuple_form and ("minItems" in node or "maxItems" in node):
            self.fail(
                f"{path}.minItems" if "minItems" in node else f"{path}.maxItems", "item counts of tuples are fixed"
            )
        if ("minItems" in node or "maxItems" in node) and items is None and prefix is None:
            key = "minItems" if "minItems" in node else "maxItems"
            self.fail(f"{path}.{key}", f"'{key}' needs 'items'")
        self._count(node, path, "minItems", "maxItems")

    def _string(self, node: dict, path: str) -> None:
        t = node.get("type")
        if "pattern" in node:
            p = node["pattern"]
            if t not in (None, "string"):
                self.fail(f"{path}.pattern", "'pattern' applies to strings")
            if "format" in node:
                self.fail(f"{path}.format", "'format' beside 'pattern' would not be enforced")
            if not isinstance(p, str) or len(p) > 2000:
                self.fail(f"{path}.pattern", "'pattern' must be a regular expression of at most 2000 characters")
            if "(?" in p or re.search(r"\\[1-9bBdDsSwW]", p):
                self.fail(f"{path}.pattern", "lookarounds, backreferences, \\b and class escapes are not supported")
            try:
                re.compile(p)
            except re.error as exc:
                self.fail(f"{path}.pattern", f"'pattern' is not a regular expression: {exc}")
        if "format" in node:
            f = node["format"]
            if not isinstance(f, str) or f not in FORMATS:
                self.fail(f"{path}.format", f"the string format {str(f)[:40]!r} is not supported")
            if t not in (None, "string"):
                self.fail(f"{path}.format", "'format' applies to strings")
        if "minLength" in node or "maxLength" in node:
            if t != "string":
                self.fail(f"{path}.minLength" if "minLength" in node else f"{path}.maxLength", "needs 'type': 'string'")
            if "pattern" in node or "format" in node:
                self.fail(f"{path}.maxLength", "string lengths beside 'pattern' or 'format' would not be enforced")
            self._count(node, path, "minLength", "maxLength")


def check_schema(schema, path: str = "schema") -> None:
    """Raise SchemaError (with the keyword's path, prefixed by ``path``) unless the converter enforces all of it."""
    if not isinstance(schema, dict):
        raise SchemaError("the schema must be a JSON object", path)
    _Checker(schema).schema(schema, path, 0)


def anchored(pattern: str) -> str:
    """JSON Schema patterns match anywhere; the converter needs ``^...$``. A string that matches the anchored
    pattern matches the unanchored one too, so anchoring keeps every output valid."""
    return ("" if pattern.startswith("^") else "^") + pattern + ("" if pattern.endswith("$") else "$")
