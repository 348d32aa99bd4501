"""llama.cpp's grammar sampler in a sequence's chain, on the demo model (real llama.cpp, no mocks): constrained
greedy output matches the grammar, bad grammars are a GrammarError naming the problem, tokens the grammar
refuses are refused before llama.cpp would end the process."""

from __future__ import annotations

import json
import re

import jsonschema
import llama_cpp as llama
import numpy as np
import pytest

from chatloop.coordinator.chat_template import ChatTemplate
from chatloop.coordinator.structured_output import schema_to_gbnf
from chatloop.coordinator.tool_calls import parse_tool_request
from chatloop.coordinator.tool_grammar import tool_grammar
from chatloop.coordinator.tool_parsers import parse_reply
from chatloop.coordinator.tool_prompt import probe, render_chat
from chatloop.demo import demo_gguf
from chatloop.engine.grammar import (
    GrammarError,
    GrammarSampler,
    accept_checked,
    add_grammar,
    check_grammar,
    grammar_allows,
)
from chatloop.engine.handles import Batch, Context, Model, Sampler
from chatloop.engine.tokenizer import Tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}


class Greedy:
    """The demo model in one context: prompt, then greedy steps through a given sampler chain."""

    def __init__(self) -> None:
        self.model = Model(demo_gguf())
        params = llama.llama_context_default_params()
        params.n_ctx = 1024
        params.n_batch = 512
        params.n_threads = params.n_threads_batch = 2
        params.no_perf = True
        self.ctx = Context(self.model, params)
        self.batch = Batch(512)
        self.tok = Tokenizer(demo_gguf())
        self.template = ChatTemplate.from_tokenizer(self.tok)

    def close(self) -> None:
        self.tok.close()
        self.model.close()

    def chat_prompt(self, question: str) -> list[int]:
        text = self.template.render([{"role": "user", "content": question}])
        return self.tok.tokenize(text, add_special=False)

    def run(self, prompt: list[int], chain: Sampler, max_tokens: int) -> tuple[str, list[int]]:
        self.ctx.clear()
        n = len(prompt)
        out = np.zeros(n, dtype=np.int8)
        out[-1] = 1
        self.batch.fill(np.arange(n), np.zeros(n), out, tokens=np.array(prompt))
        self.ctx.decode(self.batch)
        generated: list[int] = []
        for pos in range(n, n + max_tokens):
            token = chain.sample(self.ctx, 0 if generated else n - 1)
            if self.tok.is_eog(token):
                break
            generated.append(token)
            self.batch.fill(np.array([pos]), np.zeros(1), np.ones(1), tokens=np.array([token]))
            self.ctx.decode(self.batch)
        return self.tok.detokenize(generated), generated


@pytest.fixture(scope="module")
def greedy():
    g = Greedy()
    yield g
    g.close()


def _chain(g: Greedy, gbnf: str | None, **lazy) -> Sampler:
    chain = Sampler()
    if gbnf is not None:
        add_grammar(chain, g.model.vocab, gbnf, **lazy)
    chain.add(llama.llama_sampler_init_greedy())
    return chain


def test_grammar_constrains_greedy_output(greedy):
    prompt = greedy.chat_prompt("How many legs does a spider have? Answer in one sentence.")
    free, _ = greedy.run(prompt, _chain(greedy, None), 24)
    gbnf = 'root ::= "The answer is " [0-9]+ " legs."'
    text, _ = greedy.run(prompt, _chain(greedy, gbnf), 24)
    assert re.fullmatch(r"The answer is [0-9]+ legs\.", text), text
    assert text != free  # the grammar changed what the model wrote


def test_json_schema_grammar_yields_valid_json(greedy):
    gbnf = schema_to_gbnf(PERSON)
    prompt = greedy.chat_prompt("Describe a made-up person as JSON with name, age, role, tags and address.")
    text, _ = greedy.run(prompt, _chain(greedy, gbnf), 200)
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    assert set(value) == set(PERSON["required"])
    assert isinstance(value["age"], int) and value["role"] in ("admin", "user", "guest")
    assert re.fullmatch(r"[0-9]{5}", value["address"]["zip"])
    assert len(value["tags"]) <= 3


def _late(g: Greedy, gbnf: str, **lazy) -> GrammarSampler:
    chain = GrammarSampler(g.model.vocab, g.model.n_vocab, gbnf, **lazy)
    chain.add(llama.llama_sampler_init_greedy())
    return chain


def test_grammar_checked_after_the_pick_gives_the_same_output(greedy):
    """llama-server's default order (pick, check one token, re-pick with the grammar only when refused) gives
    the same greedy text as the grammar first in the chain."""
    gbnf = schema_to_gbnf(PERSON)
    prompt = greedy.chat_prompt("Describe a made-up person as JSON with name, age, role, tags and address.")
    first, toks_first = greedy.run(prompt, _chain(greedy, gbnf), 120)
    late = _late(greedy, gbnf)
    text, toks = greedy.run(prompt, late, 120)
    assert toks == toks_first and json.loads(text)
    assert 0 < late.resampled < len(toks)  # the grammar overruled some picks, not all
    late.close()
    fresh = _late(greedy, gbnf)
    with pytest.raises(GrammarError, match="does not fit"):
        fresh.accept(greedy.tok.eos)  # not before the grammar is complete (llama.cpp would abort)
    fresh.close()
    with pytest.raises(GrammarError, match="Undefined rule"):
        GrammarSampler(greedy.model.vocab, greedy.model.n_vocab, "root ::= nothing")


def test_unconstrained_chain_unchanged(greedy):
    """An empty grammar string is refused, so 'no grammar' always means no grammar sampler at all."""
    prompt = greedy.chat_prompt("Say hello.")
    a, _ = greedy.run(prompt, _chain(greedy, None), 12)
    b, _ = greedy.run(prompt, _chain(greedy, None), 12)
    assert a == b
    with pytest.raises(GrammarError, match="empty"):
        _chain(greedy, "  ")


@pytest.mark.parametrize(
    ("gbnf", "problem"),
    [
        ('root ::= "abc', "unexpected end of input"),
        ("root ::= item", "Undefined rule identifier 'item'"),
        ('start ::= "a"', "does not contain a 'root' symbol"),
        ('root ::= root "a"', "left recursion"),
        ('root ::= "a" {3', "expecting"),
        ("root ::= [a-", "unexpected end of input"),
        ("root ::= " + "(" * 100 + '"a"' + ")" * 100, "nests parentheses 100 deep"),
        ('root ::= "a"{5000}', "repetitions exceeds sane defaults"),
    ],
)
def test_bad_grammar_is_a_clear_error(gbnf, problem):
    with pytest.raises(GrammarError) as err:
        check_grammar(gbnf)
    assert problem in str(err.value)


def test_token_references_need_the_vocab(greedy):
    gbnf = 'root ::= "ok" <|im_end|>'
    with pytest.raises(GrammarError, match="no vocab"):
        check_grammar(gbnf)
    check_grammar(gbnf, greedy.model.vocab)  # the coordinator's vocab-only model is enough
    check_grammar(gbnf, greedy.tok.vocab)


def test_grammar_must_come_first(greedy):
    chain = Sampler()
    chain.add(llama.llama_sampler_init_top_k(40))
    with pytest.raises(ValueError, match="first sampler"):
        add_grammar(chain, greedy.model.vocab, 'root ::= "a"')
    chain.close()


def test_accept_checked_refuses_what_llama_cpp_would_abort_on(greedy):
    chain = _chain(greedy, 'root ::= "yes" | "no"')
    tok = greedy.tok
    (bad,) = tok.tokenize("maybe", add_special=False)[:1]
    assert not grammar_allows(chain, bad)
    with pytest.raises(GrammarError, match="does not fit"):
        accept_checked(chain, bad)
    assert not grammar_allows(chain, tok.eos)  # end of generation only once the grammar is complete
    for t in tok.tokenize("yes", add_special=False):
        accept_checked(chain, t)
    assert grammar_allows(chain, tok.eos)
    chain.close()


def test_lazy_grammar_waits_for_its_trigger(greedy):
    tok = greedy.tok
    gbnf = 'root ::= "<tool_call>" " "? "{" [a-z]+ "}"'
    chain = _chain(greedy, gbnf, trigger_patterns=[r"[\s\S]*?(<tool_call>)[\s\S]*"])
    for t in tok.tokenize("Sure, calling it now. ", add_special=False):
        assert grammar_allows(chain, t)  # free text before the trigger
        accept_checked(chain, t)
    for t in tok.tokenize("<tool_call>", add_special=False):
        accept_checked(chain, t)
    (digit,) = tok.tokenize("7", add_special=False)
    (brace,) = tok.tokenize("{", add_special=False)
    assert grammar_allows(chain, brace) and not grammar_allows(chain, digit)
    chain.close()


def test_bad_trigger_pattern_is_refused(greedy):
    with pytest.raises(GrammarError, match="trigger pattern"):
        _chain(greedy, 'root ::= "a"', trigger_patterns=["(unclosed"])


def test_required_tool_call_on_the_demo_model(greedy):
    """SmolLM2's template has no tools: the generic format, constrained by the tool grammar, gives a valid call
    of a declared tool that the parser turns into an OpenAI tool call."""
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
    req = parse_tool_request({"tools": [weather], "tool_choice": "required", "parallel_tool_calls": False})
    caps = probe(greedy.template)
    rendered = render_chat(greedy.template, caps, [{"role": "user", "content": "What is the weather in Paris?"}], req)
    grammar = tool_grammar(req, rendered.format)
    chain = GrammarSampler(greedy.model.vocab, greedy.model.n_vocab, grammar.gbnf)
    chain.add(llama.llama_sampler_init_greedy())
    text, _ = greedy.run(greedy.tok.tokenize(rendered.prompt, add_special=False), chain, 80)
    reply = parse_reply(text, rendered.format, req)
    assert reply.finish_reason == "tool_calls", text
    (call,) = reply.tool_calls
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), weather["function"]["parameters"])
