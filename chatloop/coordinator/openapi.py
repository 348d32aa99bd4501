"""The coordinator's OpenAPI 3 document, served at ``/openapi.json``."""

from __future__ import annotations

from chatloop import __version__
from chatloop.config import SPECULATIVE_METHODS
from chatloop.coordinator.api_schema import MAX_MESSAGES, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOKENS_LIMIT, ROLES
from chatloop.coordinator.web import openapi_paths as web_openapi_paths
from chatloop.protocol.messages import MAX_DRAFT
from chatloop.protocol.sampling import LIMITS, LOGIT_BIAS_LIMIT, MAX_LOGIT_BIAS, Limit

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_MAX_TOKENS = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_LIMIT}


def _range(limit: Limit, lo: float | None = None) -> dict:
    """JSON Schema of a sampling number from its one definition (``protocol.sampling.LIMITS``); ``lo`` widens
    the lower bound where the API takes a conventional value the sampler does not (top_k -1, top_p 0)."""
    out = {"type": "integer" if limit.integer else "number", "minimum": limit.lo if lo is None else lo}
    if limit.lo_open and lo is None:
        out["exclusiveMinimum"] = out.pop("minimum")
    out["maximum"] = limit.hi
    return out


_SAMPLING = {
    "max_tokens": _MAX_TOKENS,
    "temperature": _range(LIMITS["temperature"]),
    "top_p": _range(LIMITS["top_p"], lo=0),
    "top_k": _range(LIMITS["top_k"], lo=-1),
    "min_p": _range(LIMITS["min_p"]),
    "presence_penalty": _range(LIMITS["presence_penalty"]),
    "frequency_penalty": _range(LIMITS["frequency_penalty"]),
    "repeat_penalty": _range(LIMITS["repeat_penalty"]),
    "repetition_penalty": _range(LIMITS["repeat_penalty"]),
    "seed": {"type": "integer"},
    "stop": {
        "oneOf": [
            {"type": "string", "maxLength": MAX_STOP_CHARS},
            {
                "type": "array",
                "items": {"type": "string", "maxLength": MAX_STOP_CHARS},
                "maxItems": MAX_STOP_STRINGS,
            },
        ]
    },
    "logit_bias": {
        "type": "object",
        "description": "token id (as a string) to a bias added to its logit",
        "propertyNames": {"pattern": "^[0-9]{1,10}$"},
        "additionalProperties": _range(LOGIT_BIAS_LIMIT),
        "maxProperties": MAX_LOGIT_BIAS,
    },
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": ["boolean", "null"]}}},
    "n": {"type": "integer", "enum": [1]},
    "speculative": {
        "type": "object",
        "description": "overrides of the server's speculative decoding settings (output is the same either way)",
        "properties": {
            "method": {"type": "string", "enum": list(SPECULATIVE_METHODS)},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_DRAFT},
            "min_tokens": {"type": "integer", "minimum": 0, "maximum": MAX_DRAFT},
        },
        "additionalProperties": False,
    },
}

_USAGE = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}},
    },
}


def _errors(*codes: int) -> dict:
    return {
        str(c): {
            "description": "error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for c in codes
    }


def _nullable(schema: dict) -> dict:
    """``schema`` or null: like OpenAI's API, the server takes a null optional field as an absent one."""
    if "oneOf" in schema:
        return {**schema, "oneOf": [*schema["oneOf"], {"type": "null"}]}
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    out = {**schema, "type": types if "null" in types else [*types, "null"]}
    if "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    return out


def _request(required: dict, optional: dict) -> dict:
    # NOTE: "n" is the one optional field that must not be null (only n=1 is served, and null is not 1).
    props = {k: v if k == "n" else _nullable(v) for k, v in optional.items()}
    return {"type": "object", "required": list(required), "properties": {**required, **props}}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document(model: str) -> dict:
    completion_req = _request(
        {
            "prompt": {
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                ]
            }
        },
        {
            "model": {"type": "string"},
            "logprobs": _range(LIMITS["n_logprobs"]),
            "echo": {"type": "boolean", "enum": [False]},
            **_SAMPLING,
        },
    )
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "enum": list(ROLES)},
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "null"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "text"],
                            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
                        },
                    },
                ]
            },
        },
    }
    chat_req = _request(
        {"messages": {"type": "array", "items": message, "minItems": 1, "maxItems": MAX_MESSAGES}},
        {
            "model": {"type": "string"},
            "logprobs": {"type": "boolean"},
            "top_logprobs": _range(LIMITS["n_logprobs"]),
            "max_completion_tokens": _MAX_TOKENS,
            **_SAMPLING,
        },
    )
    # top_logprobs > 0 needs logprobs: true.
    chat_req["if"] = {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]}
    chat_req["then"] = {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}
    native_req = _request(
        {"prompt": {"type": "string", "minLength": 1}},
        {
            "model_id": {"type": "string"},
            **{k: v for k, v in _SAMPLING.items() if k not in ("stream", "stream_options")},
        },
    )
    completion = {
        "type": "object",
        "required": ["id", "object", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array"},
            "usage": _USAGE,
        },
    }
    native_resp = {
        "type": "object",
        "required": ["text", "tokens", "usage", "finish_reason"],
        "properties": {
            "text": {"type": "string"},
            "tokens": {"type": "array", "items": {"type": "integer"}},
            "usage": _USAGE,
            "finish_reason": {"type": "string", "enum": ["stop", "length"]},
            "model_id": {"type": "string"},
            "request_id": {"type": "string"},
        },
    }
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    # NOTE: OpenAPI 3.1 has no stream item schema (3.2 adds itemSchema); tools read ``schema`` as one event.
    sse_event = {
        "type": "object",
        "description": "one server-sent event; data is a JSON chunk (chat.completion.chunk or text_completion), "
        "an {error} object, or [DONE]",
        "required": ["data"],
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    }
    sse = {"text/event-stream": {"schema": sse_event}}

    def post(summary: str, req: dict, resp: dict, stream: bool) -> dict:
        ok = _json(resp)
        if stream:
            ok["content"].update(sse)
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, "content": {"application/json": {"schema": req}}},
                "responses": {"200": ok, **_errors(400, 401, 404, 413, 503)},
            }
        }

    def get(summary: str, schema: dict, *codes: int, text: bool = False) -> dict:
        ok = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}} if text else _json(schema)
        return {"get": {"summary": summary, "responses": {"200": ok, **_errors(*codes)}}}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ChatLoop coordinator",
            "version": __version__,
            "description": f"OpenAI-compatible API serving {model}. Unknown request fields are ignored.",
        },
        "paths": {
            "/v1/completions": post("Text completion", completion_req, completion, True),
            "/v1/chat/completions": post("Chat completion", chat_req, completion, True),
            "/v1/inference": post("Native inference request", native_req, native_resp, False),
            "/v1/models": get(
                "Served models",
                {"type": "object", "properties": {"object": {"type": "string"}, "data": {"type": "array"}}},
                401,
            ),
            "/v1/cluster": get("Stage replicas and their state", {"type": "object"}, 401),
            "/healthz": get("Liveness", status),
            "/readyz": {
                "get": {"summary": "Readiness", "responses": {"200": _json(status), "503": _json(status, "not ready")}}
            },
            "/metrics": get("Prometheus metrics", {}, text=True),
            "/openapi.json": get("This document", {"type": "object"}),
            **web_openapi_paths(),
        },
        "components": {"schemas": {"Error": _ERROR}},
    }
