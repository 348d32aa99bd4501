"""Chat templates from the GGUF metadata, rendered in a sandboxed Jinja environment with bounded output.

Templates are Hugging Face's Jinja dialect; the sandbox blocks attribute access to Python internals, and
rendering stops once the output passes a size limit.
"""

from __future__ import annotations

import datetime
import logging

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

MAX_OUTPUT_CHARS = 4_000_000

# ChatML: the fallback for models whose GGUF carries no template.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    pass


class _Bounded(ImmutableSandboxedEnvironment):
    # Caps range() inside templates (the sandbox's own limit is 100000).
    MAX_RANGE = 10_000


def _raise(message: str):
    raise ChatTemplateError(f"chat template: {message}")


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = _Bounded(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatTemplate:
        source = tokenizer.chat_template()
        if not source:
            log.warning("the model has no chat template; using ChatML")
            source = CHATML
        bos = tokenizer.token_text(tokenizer.bos) if tokenizer.bos >= 0 else ""
        eos = tokenizer.token_text(tokenizer.eos) if tokenizer.eos >= 0 else ""
        return cls(source, bos, eos)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        out: list[str] = []
        size = 0
        try:
            for chunk in self._template.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            ):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise ChatTemplateError(f"chat template output exceeds {MAX_OUTPUT_CHARS} characters")
                out.append(chunk)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            raise ChatTemplateError(f"chat template failed on these messages: {exc}") from None
        return "".join(out)
