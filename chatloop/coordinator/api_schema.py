"""Request validation for the OpenAI-compatible and native endpoints.

Every field is checked for type and range; a problem raises ``RequestError`` naming the field, which the
handlers turn into a 400 in the OpenAI error shape. Unknown fields are ignored, as OpenAI-compatible
servers (vLLM, llama-server) do, so clients that send newer fields keep working.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chatloop.config import SPECULATIVE_METHODS
from chatloop.protocol.messages import MAX_DRAFT
from chatloop.protocol.sampling import LIMITS, LOGIT_BIAS_LIMIT, MAX_LOGIT_BIAS, SEED_LIMIT, SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
MAX_TOKENS_LIMIT = 1 << 20
ROLES = ("system", "developer", "user", "assistant", "tool")
_TOKEN_KEY = re.compile(r"[0-9]{1,10}")

if TYPE_CHECKING:  # these modules import RequestError from here
    from chatloop.coordinator.structured_output import OutputConstraint
    from chatloop.coordinator.tool_calls import ToolRequest


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


@dataclass
class GenerationRequest:
    kind: str  # completion | chat | native
    model: str | None
    prompt_text: str | None = None  # completions and native
    prompt_tokens: list[int] | None = None  # completions given token ids
    messages: list[dict] | None = None  # chat
    max_tokens: int | None = None  # None: server default, bounded by the context
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    speculative: dict | None = None  # overrides of the server's speculative settings (method, max/min_tokens)
    logprobs: bool = False
    top_logprobs: int = 0
    # Set by ``structured_request.apply_output_fields``:
    output: OutputConstraint | None = None  # response_format / grammar
    tools: ToolRequest | None = None  # chat: the declared tools and tool_choice; None = no tools
    tool_format: str = "generic"  # chat: the syntax the reply's tool calls are parsed in (tool_prompt.FORMATS)


def _num(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False, aliases: tuple[str, ...] = ()):
    """The number under ``key`` (else the first of its ``aliases`` given), checked; every alias given is checked."""
    found = [(name, body.get(name)) for name in (key, *aliases) if body.get(name) is not None]
    for name, value in found:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"'{name}' must be a number", name)
        # NOTE: JSON integers are unbounded; never turn one into a float (OverflowError) or a long string (ValueError).
        if integer and isinstance(value, float) and not value.is_integer():
            raise RequestError(f"'{name}' must be an integer", name)
        if (isinstance(value, float) and not math.isfinite(value)) or not lo <= value <= hi:
            raise RequestError(f"'{name}' must be between {lo:g} and {hi:g}, got {_show(value)}", name)
    if not found:
        return default
    value = found[0][1]
    return int(value) if integer else float(value)


def _limited(body: dict, key: str, default, aliases: tuple[str, ...] = ()):
    """A sampling number checked against its one definition in ``protocol.sampling.LIMITS``."""
    limit = LIMITS[key]
    return _num(body, key, default, limit.lo, limit.hi, integer=limit.integer, aliases=aliases)


def _show(value) -> str:
    """A value for an error message: huge integers are not printed (and cannot be, past 4300 digits)."""
    return str(value) if not isinstance(value, int) or abs(value) < 10**18 else "a number that large"


def _utf8(text: str, param: str, what: str) -> str:
    """``text`` if it can be encoded as UTF-8: JSON's ``"\\ud800"`` escapes give lone surrogates, which cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{what} contains a lone UTF-16 surrogate (not valid Unicode text)", param) from None
    return text


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{key}' must be true or false", key)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise RequestError(f"each stop string may be at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(_utf8(s, "stop", "a stop string") for s in stop if s)


def _logit_bias(body: dict, n_vocab: int) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise RequestError("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    if len(bias) > MAX_LOGIT_BIAS:
        raise RequestError(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} entries", "logit_bias")
    out = {}
    for k, v in bias.items():
        # Keys as the document states them (1 to 10 ASCII digits), not all that int() takes (" 7", "+7", "٧").
        if isinstance(k, str) and _TOKEN_KEY.fullmatch(k):
            tok = int(k)
        elif isinstance(k, int) and not isinstance(k, bool):
            tok = k
        else:
            raise RequestError(f"'logit_bias' key {str(k)[:40]!r} is not a token id", "logit_bias")
        if not 0 <= tok < n_vocab:
            raise RequestError(
                f"'logit_bias' token id {_show(tok)} is outside the vocabulary (0..{n_vocab - 1})", "logit_bias"
            )
        if not LOGIT_BIAS_LIMIT.admits(v):
            raise RequestError(
                f"'logit_bias' value for {tok} must be a number in {LOGIT_BIAS_LIMIT.describe()}", "logit_bias"
            )
        out[tok] = float(v)
    return out


def _speculative(body: dict) -> dict | None:
    """``speculative: {"method": "ngram" | "draft" | "off", "max_tokens": 1..62, "min_tokens": 0..62}``, each
    optional (the server's otherwise)."""
    spec = body.get("speculative")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise RequestError("'speculative' must be an object", "speculative")
    unknown = sorted(set(spec) - {"method", "max_tokens", "min_tokens"})
    if unknown:
        raise RequestError(f"'speculative' takes method, max_tokens and min_tokens, not {unknown[0]!r}", "speculative")
    out: dict = {}
    if spec.get("method") is not None:
        if spec["method"] not in SPECULATIVE_METHODS:
            raise RequestError(
                f"'speculative.method' must be one of {', '.join(SPECULATIVE_METHODS)}", "speculative.method"
            )
        out["method"] = spec["method"]
    if spec.get("max_tokens") is not None:
        out["max_tokens"] = _num(spec, "max_tokens", None, 1, MAX_DRAFT, integer=True)
    if spec.get("min_tokens") is not None:
        out["min_tokens"] = _num(spec, "min_tokens", None, 0, MAX_DRAFT, integer=True)
    return out


def _common(body: dict, kind: str, n_vocab: int, default_temperature: float = 1.0) -> GenerationRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model_key = "model_id" if kind == "native" else "model"
    model = body.get(model_key)
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'{model_key}' must be a string", model_key)
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise RequestError("only n=1 is supported", "n")
    if body.get("best_of") not in (None, 1):
        raise RequestError("only best_of=1 is supported", "best_of")
    # API conventions on top of the sampler's own ranges (LIMITS): top_k -1 means off (as 0), and OpenAI's
    # top_p 0 means "only the most likely token".
    top_k = _num(body, "top_k", 0, -1, LIMITS["top_k"].hi, integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", "seed")
    sampling_kwargs = dict(
        temperature=_limited(body, "temperature", default_temperature),
        top_p=_num(body, "top_p", 1.0, 0.0, LIMITS["top_p"].hi),
        top_k=max(top_k, 0),
        min_p=_limited(body, "min_p", 0.0),
        presence_penalty=_limited(body, "presence_penalty", 0.0),
        frequency_penalty=_limited(body, "frequency_penalty", 0.0),
        repeat_penalty=_limited(body, "repeat_penalty", 1.0, aliases=("repetition_penalty",)),
        seed=None if seed is None else seed % SEED_LIMIT,
        logit_bias=_logit_bias(body, n_vocab),
    )
    if sampling_kwargs["top_p"] == 0.0:
        sampling_kwargs["top_p"] = 1e-9  # OpenAI allows 0: keep only the most likely token
    max_tokens = _num(body, "max_tokens", None, 1, MAX_TOKENS_LIMIT, integer=True, aliases=("max_completion_tokens",))
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    include_usage = (opts or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise RequestError("'stream_options.include_usage' must be true or false", "stream_options")
    req = GenerationRequest(
        kind=kind,
        model=model,
        max_tokens=max_tokens,
        stop=_stop(body),
        stream=stream,
        include_usage=bool(include_usage),
        speculative=_speculative(body),
    )
    req.sampling = SamplingParams(**sampling_kwargs)
    return req


def _with_logprobs(req: GenerationRequest, logprobs: bool, top: int) -> GenerationRequest:
    req.logprobs = logprobs
    req.top_logprobs = top
    s = req.sampling
    req.sampling = SamplingParams(**{**s.__dict__, "want_logprobs": logprobs, "n_logprobs": top})
    return req


def _is_token_id(t) -> bool:
    return (isinstance(t, int) and not isinstance(t, bool)) or (isinstance(t, float) and t.is_integer())


def parse_completion(body, n_vocab: int) -> GenerationRequest:
    req = _common(body, "completion", n_vocab)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.prompt_text = _utf8(prompt, "prompt", "'prompt'")
    elif isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        # Integral floats (3.0) are integers to JSON Schema, as they are for max_tokens here.
        if not all(0 <= t < n_vocab for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {n_vocab})", "prompt")
        req.prompt_tokens = [int(t) for t in prompt]
    else:
        raise RequestError("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
    if _bool(body, "echo"):
        raise RequestError("'echo' is not supported", "echo")
    if body.get("suffix"):
        raise RequestError("'suffix' is not supported", "suffix")
    lp = body.get("logprobs")
    top = LIMITS["n_logprobs"]
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not top.admits(lp)):
        raise RequestError(f"'logprobs' must be an integer between 0 and {top.hi:g}", "logprobs")
    return _with_logprobs(req, lp is not None, lp or 0)


def _content(msg: dict, i: int) -> str:
    content = msg.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return _utf8(content, "messages", f"messages[{i}].content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{i}].content[{j}]: only text parts are supported", "messages")
            parts.append(part["text"])
        return _utf8("".join(parts), "messages", f"messages[{i}].content")
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", "messages")


def parse_chat(body, n_vocab: int) -> GenerationRequest:
    req = _common(body, "chat", n_vocab)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"at most {MAX_MESSAGES} messages", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}", "messages")
        clean.append({"role": "system" if role == "developer" else role, "content": _content(m, i)})
    req.messages = clean
    lp = _bool(body, "logprobs")
    top = _num(body, "top_logprobs", 0, 0, LIMITS["n_logprobs"].hi, integer=True)
    if top and not lp:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return _with_logprobs(req, lp, top)


def parse_native(body, n_vocab: int) -> GenerationRequest:
    """The original spec's request: ``{model_id, prompt, max_tokens, temperature, ...}``."""
    req = _common(body, "native", n_vocab)
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string", "prompt")
    req.prompt_text = _utf8(prompt, "prompt", "'prompt'")
    if req.stream:
        raise RequestError("/v1/inference does not stream; use /v1/completions with stream=true", "stream")
    return req
