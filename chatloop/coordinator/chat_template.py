"""Chat templates from the GGUF metadata, rendered in a sandboxed Jinja environment with bounded time and size.

Templates are Hugging Face's Jinja dialect and come with the model file, so they are treated as untrusted code:

- Jinja's immutable sandbox blocks attribute access to Python internals and mutation of lists and dicts;
- rendering stops after ``timeout_secs`` (a trace function checks the clock on every line the compiled
  template runs, so loops without output are caught too);
- no expression may build a string or list longer than ``MAX_VALUE_CHARS`` (checked before the operations
  that can grow one in a single C call: ``*``, ``%`` and ``str.format`` widths, padding methods and filters,
  and stringifying a container), and the output stops past ``MAX_OUTPUT_CHARS``.

Deep recursion ends in Python's RecursionError. Every failure is a ``ChatTemplateError``.
"""

from __future__ import annotations

import datetime
import functools
import logging
import re
import sys
import time

from jinja2 import TemplateError
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace

log = logging.getLogger(__name__)

MAX_OUTPUT_CHARS = 4_000_000
MAX_VALUE_CHARS = MAX_OUTPUT_CHARS  # longest string, list or printed container one expression may build
MAX_RANGE = 10_000  # longest range() (Jinja's sandbox allows 100000)
MAX_EXPONENT = 10_000  # largest integer exponent of ``**``
RENDER_TIMEOUT_SECS = 1.0  # CPU seconds of the rendering thread (a busy machine does not shorten it)

# printf-style (``%`` and the ``format`` filter) and str.format specs whose width or precision alone would build
# a huge string, or comes from an argument.
_PRINTF_WIDTH = re.compile(r"%[-#0 +]*(?:\*|\d{7,})|%[-#0 +]*\d*\.(?:\*|\d{7,})")
_FORMAT_WIDTH = re.compile(r"\{[^{}]*:[^{}]*\d{7,}")
# Filters that turn a container into text (the whole of it, nested values included).
_STRINGIFYING_FILTERS = {"string", "tojson", "pprint", "join", "format", "urlencode", "xmlattr", "e", "escape"}

# ChatML: the fallback for models whose GGUF carries no template.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    pass


class _TimeUp(BaseException):
    """Raised inside the template's frames when its time is up. NOTE: a BaseException, so that no
    ``except Exception`` in a filter or in Jinja's runtime can swallow it and keep the loop running."""


def _raise(message: str):
    raise ChatTemplateError(f"chat template: {message}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text_size(value, limit: int = MAX_VALUE_CHARS) -> int:
    """About how many characters printing ``value`` gives (shared references count every time, as printing
    does); stops counting once past ``limit``, so it costs at most ``limit`` steps."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, Namespace):
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        else:
            total += 8
    return total


def _refuse(what: str) -> SecurityError:
    return SecurityError(f"{what} would exceed the template size limit of {MAX_VALUE_CHARS} characters")


def _check_printed(*values) -> None:
    for v in values:
        if not isinstance(v, (str, int, float)) and _text_size(v) > MAX_VALUE_CHARS:
            raise _refuse("printing a container")


def _checked(value):
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_VALUE_CHARS:
        raise _refuse(f"a value of {len(value)} items")
    return value


def _check_widths(args, kwargs) -> None:
    for v in (*args, *kwargs.values()):
        if is_int(v) and abs(v) > MAX_VALUE_CHARS:
            raise _refuse(f"a width or count of {v if abs(v) < 10**18 else 'that size'}")


def _bounded_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise SecurityError(f"range() of {len(rng)} items; templates may use at most {MAX_RANGE}")
    return rng


def _bounded_filter(name: str, func):
    # The filtered value comes after the context, eval context or environment a marked filter takes first;
    # widths and counts come after the value.
    n_lead = 2 if getattr(func, "jinja_pass_arg", None) else 1

    @functools.wraps(func)  # NOTE: keeps Jinja's pass_context / pass_environment marks
    def wrapper(*args, **kwargs):
        _check_widths(args[n_lead:], kwargs)
        if name in _STRINGIFYING_FILTERS:
            _check_printed(*args, *kwargs.values())
            if name == "format" and any(isinstance(a, str) and _PRINTF_WIDTH.search(a) for a in args):
                raise _refuse("a printf width")
        return _checked(func(*args, **kwargs))

    return wrapper


class _CodeGenerator(CodeGenerator):
    def visit_Concat(self, node, frame) -> None:
        # ``a ~ b`` becomes environment.concat_checked((a, b)): each part is size-checked before it is printed.
        self.write("environment.concat_checked((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Bounded(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "%", "**", "+"})

    def __init__(self, **kwargs) -> None:
        super().__init__(finalize=self._finalize, **kwargs)
        self.globals["range"] = _bounded_range
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def unsafe_undefined(self, obj, attribute: str):
        # Jinja returns an Undefined that prints as nothing; a template reaching for internals is an error.
        raise SecurityError(f"a chat template may not access {attribute!r} of a {type(obj).__name__} object")

    @staticmethod
    def _finalize(value):
        _check_printed(value)  # what ``{{ value }}`` is about to print
        return value

    def concat_checked(self, parts: tuple) -> str:
        _check_printed(*parts)
        return _checked("".join(map(str, parts)))

    def call_binop(self, context, operator: str, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and is_int(n) and len(seq) * n > MAX_VALUE_CHARS:
                    raise _refuse(f"repeating {len(seq)} items that many times")
        elif operator == "**":
            if is_int(left) and is_int(right) and abs(left) > 1 and right > MAX_EXPONENT:
                raise SecurityError(f"an exponent larger than {MAX_EXPONENT}")
        elif operator == "%" and isinstance(left, str):
            if _PRINTF_WIDTH.search(left):
                raise _refuse("a printf width")
            _check_printed(right)
        return _checked(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if isinstance(getattr(method, "__self__", None), str):
            _check_widths(args, kwargs)  # "x".ljust(10**10), "x".center(...), "{:{}}".format(1, 10**10)
            if getattr(method, "__name__", "") in ("format", "format_map"):
                if _FORMAT_WIDTH.search(method.__self__):
                    raise _refuse("a format width")
                _check_printed(*args, *kwargs.values())
        return _checked(super().call(__context, __obj, *args, **kwargs))


class ChatTemplate:
    def __init__(
        self, source: str, bos_token: str = "", eos_token: str = "", timeout_secs: float = RENDER_TIMEOUT_SECS
    ) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.timeout_secs = timeout_secs
        env = _Bounded(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from None
        self._filename = self._template.root_render_func.__code__.co_filename

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatTemplate:
        source = tokenizer.chat_template()
        if not source:
            log.warning("the model has no chat template; using ChatML")
            source = CHATML
        bos = tokenizer.token_text(tokenizer.bos) if tokenizer.bos >= 0 else ""
        eos = tokenizer.token_text(tokenizer.eos) if tokenizer.eos >= 0 else ""
        return cls(source, bos, eos)

    def render(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None, **extra
    ) -> str:
        """``tools``: OpenAI function tools, given to the template as Hugging Face's ``tools`` variable."""
        out: list[str] = []
        size = 0
        # NOTE: CPU time of this thread, not wall time: a render is refused for the work it does, not because other
        # processes share the cores.
        deadline = time.thread_time() + self.timeout_secs
        filename = self._filename

        def tracer(frame, event, arg):
            # Called for every Python call during the render, and for every line of the template's own code.
            if time.thread_time() > deadline:
                raise _TimeUp
            return tracer if frame.f_code.co_filename == filename else None

        chunks = self._template.generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            # NOTE: only when given: a template testing ``tools is defined`` renders as before without tools.
            **({"tools": tools} if tools is not None else {}),
            **extra,
        )
        try:
            previous = sys.gettrace()
            sys.settrace(tracer)
            try:
                for chunk in chunks:
                    size += len(chunk)
                    if size > MAX_OUTPUT_CHARS:
                        raise ChatTemplateError(f"chat template output exceeds {MAX_OUTPUT_CHARS} characters")
                    out.append(chunk)
            finally:
                # NOTE: first thing, so that the tracer never fires in the handlers below.
                sys.settrace(previous)
                chunks.close()
        except ChatTemplateError:
            raise
        except _TimeUp:
            raise ChatTemplateError(f"chat template: rendering took longer than {self.timeout_secs:g} s") from None
        except Exception as exc:  # noqa: BLE001 - any failure of the model's template is a bad render, never a crash
            raise ChatTemplateError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from None
        return "".join(out)
