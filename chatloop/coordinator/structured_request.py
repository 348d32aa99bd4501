"""What a request asks of its output beyond sampling: ``response_format``, ``grammar``, ``tools``, and the
fields ChatLoop does not serve.

Runs after ``api_schema`` has checked the common fields and before the request becomes a sequence, with the
served vocabulary and chat template at hand: every grammar (the user's, one converted from a JSON schema, one
for a tool call) is built once by llama.cpp's parser here, so a bad one is a 400 before anything is admitted.
The chosen grammar then travels in the sequence's ``SamplingParams`` to the last stage (once per sequence).

- ``response_format`` / ``grammar``: ``structured_output.parse_output_constraint`` (chat, completions, native).
- ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` and the tool fields of messages (chat only):
  ``tool_calls.py``; the reply's syntax follows the chat template (``tool_prompt.reply_format``); ``required``,
  a named function and the generic format constrain the reply with ``tool_grammar.py``.
- Fields ChatLoop does not serve get a 400 naming them (``UNSUPPORTED``), never silence.
"""

from __future__ import annotations

import dataclasses
import logging

from chatloop.coordinator.api_schema import GenerationRequest, RequestError
from chatloop.coordinator.structured_output import parse_output_constraint
from chatloop.coordinator.tool_calls import ToolError, check_conversation, parse_tool_request, tool_message_fields
from chatloop.coordinator.tool_grammar import tool_grammar
from chatloop.coordinator.tool_prompt import TemplateTools, reply_format
from chatloop.engine.grammar import GrammarError, check_grammar

log = logging.getLogger(__name__)

# Request fields of the OpenAI API that change the output and that ChatLoop does not serve: a 400 names them
# (a client relying on one must not get an answer that silently lacks it). ``n`` > 1, ``best_of`` > 1, ``echo``,
# ``suffix``, non-text content parts and ``logit_bias`` outside the vocabulary are refused in ``api_schema``.
UNSUPPORTED = {
    "audio": "audio output is not served (text only)",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not available",
    "functions": "the deprecated 'functions' is not supported; use 'tools'",
    "function_call": "the deprecated 'function_call' is not supported; use 'tool_choice'",
}


def _refuse_unsupported(body: dict, kind: str) -> None:
    for key, why in UNSUPPORTED.items():
        if body.get(key) is not None:
            raise RequestError(f"'{key}' is not supported: {why}", key)
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise RequestError("'modalities' other than [\"text\"] are not supported (text output only)", "modalities")
    if kind != "chat":
        # An empty tool list or a choice that calls nothing asks for nothing (clients send them by default).
        for key, harmless in (("tools", ([],)), ("tool_choice", ("none", "auto"))):
            if body.get(key) is not None and body[key] not in harmless:
                raise RequestError(f"'{key}' is served only by /v1/chat/completions", key)


def apply_output_fields(body: dict, req: GenerationRequest, vocab, caps: TemplateTools | None) -> None:
    """Check the structured-output and tool fields of ``body`` and put what they ask for into ``req``
    (``output``, ``tools``, ``tool_format`` and the grammar in ``sampling``); RequestError names a bad field.

    ``vocab``: the coordinator's ``Tokenizer.vocab`` (grammars may name tokens); ``caps``: what the chat
    template does with tools (``tool_prompt.probe``), needed for chat requests."""
    _refuse_unsupported(body, req.kind)
    req.output = parse_output_constraint(body, vocab)
    grammar, triggers = req.output.grammar, ()
    if req.kind == "chat":
        assert req.messages is not None and caps is not None
        # NOTE: api_schema keeps one cleaned message per request message, in order.
        for i, (clean, raw) in enumerate(zip(req.messages, body["messages"], strict=True)):
            clean.update(tool_message_fields(raw, i))
        check_conversation(req.messages)
        req.tools = parse_tool_request(body)
        req.tool_format = reply_format(caps, req.messages)
        constraint = tool_grammar(req.tools, req.tool_format) if req.tools is not None else None
        if constraint is not None:
            if grammar is not None:
                param = "grammar" if req.output.kind == "grammar" else "response_format"
                raise RequestError(
                    f"'{param}' cannot be combined with tool calls (tool_choice {req.tools.choice!r}); "
                    "give tool_choice 'none' to constrain a reply that calls no tool",
                    param,
                )
            try:
                check_grammar(constraint.gbnf, vocab)
            except GrammarError as exc:  # a converter bug, or a tool schema llama.cpp cannot take
                raise ToolError(f"the tools could not be turned into a grammar: {exc}", "tools") from None
            grammar, triggers = constraint.gbnf, constraint.trigger_patterns
    if grammar is not None:
        req.sampling = dataclasses.replace(req.sampling, grammar=grammar, grammar_triggers=tuple(triggers))
        log.debug("output constrained by %d chars of GBNF (%d triggers)", len(grammar), len(triggers))
