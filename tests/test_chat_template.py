"""Chat templates are untrusted code: bounded in time and size, sandboxed, and every failure a ChatTemplateError."""

from __future__ import annotations

import resource
import sys
import time

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chatloop.coordinator.chat_template import (
    CHATML,
    MAX_OUTPUT_CHARS,
    ChatTemplate,
    ChatTemplateError,
)
from chatloop.demo import demo_gguf
from chatloop.engine.tokenizer import Tokenizer
from tests.waiting import thread_cpu_seconds

USER = [{"role": "user", "content": "Hello"}]
FAST = 0.3  # render time limit in these tests, seconds
# NOTE: the budgets below are CPU time of the rendering thread, not the wall clock: on a busy machine a render
# that does little work can still take seconds of wall time.
STOP_CPU_SECS = 1.0  # what noticing the time limit may add to the limit itself
# What refusing a size bomb may cost. The nested-list bombs cost 0.8-1.7 s today (sizing 2**64 shared references
# walks up to MAX_VALUE_CHARS of them); a missing guard means a runaway allocation, far beyond this.
BOMB_CPU_SECS = 5.0
HANG_GUARD_SECS = 60.0  # a render limit only a hang reaches (size bombs: so that only the size guards can refuse)

# In the style of Llama 3.1 / Qwen 2.5 templates: namespace, tojson, loop variables, raise_exception, strftime_now.
RICH = """{%- set ns = namespace(system='', found=false) -%}
{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] | trim -%}{%- endif -%}
{{- bos_token }}<|system|>Today is {{ strftime_now('%d %b %Y') | length > 0 }}.
{% if tools is defined %}Tools: {{ tools | tojson(indent=2) }}
{% endif %}{{ ns.system }}
{%- for message in messages -%}
  {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}
    {{- raise_exception('unknown role ' ~ message['role']) -}}
  {%- endif -%}
  {%- if message['role'] != 'system' -%}
    {%- set ns.found = true -%}
    <|{{ message['role'] }}|>{{ message['content'] | trim }}{% if not loop.last %}{{ eos_token }}{% endif %}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|assistant|>{% endif -%}"""


@pytest.fixture(scope="module")
def smollm2_template() -> ChatTemplate:
    tok = Tokenizer(demo_gguf())
    try:
        return ChatTemplate.from_tokenizer(tok)
    finally:
        tok.close()


def _plain(source: str, messages: list[dict], **extra) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(source).render(messages=messages, add_generation_prompt=True, **extra)


def _conversation(n: int) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": "system", "content": "Be brief."}] + [
        {"role": roles[i % 2], "content": f"message {i} ünïcödé"} for i in range(n)
    ]


@pytest.mark.parametrize("n", [1, 7, 4096])
def test_real_templates_render_as_plain_jinja_does(smollm2_template, n):
    # What the render gives is the point here, not how long it takes: the (wall-clock) render limit is a hang
    # guard, which 4096 messages on a busy machine can exceed at the default of 1 s.
    smol = ChatTemplate(smollm2_template.source, smollm2_template.bos_token, timeout_secs=HANG_GUARD_SECS)
    msgs = _conversation(n)
    assert smol.render(msgs) == _plain(smollm2_template.source, msgs, bos_token="<|im_start|>")
    chatml = ChatTemplate(CHATML, timeout_secs=HANG_GUARD_SECS)
    assert chatml.render(msgs) == _plain(CHATML, msgs)
    rich = ChatTemplate(RICH, "<s>", "</s>", timeout_secs=HANG_GUARD_SECS)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    want = _plain(RICH, msgs, bos_token="<s>", eos_token="</s>", tools=tools)
    assert rich.render(msgs, tools=tools) == want
    assert want.count("<|assistant|>") == n // 2 + 1


def test_large_conversation_renders_well_within_the_time_limit(smollm2_template):
    # The work of the render, in CPU time, is well under the limit (the limit itself runs on the wall clock, which
    # a busy machine stretches: rendered under a hang guard here, so that only the work is measured).
    smol = ChatTemplate(smollm2_template.source, smollm2_template.bos_token, timeout_secs=HANG_GUARD_SECS)
    with thread_cpu_seconds() as cpu:
        smol.render(_conversation(4096))
    assert cpu.seconds < smollm2_template.timeout_secs / 2


def test_raise_exception_and_broken_templates():
    with pytest.raises(ChatTemplateError, match="unknown role robot"):
        ChatTemplate(RICH).render([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    for source in ["{{ messages[5]['content'] + 1 }}", "{{ 1 / 0 }}", "{{ [1, 'a'] | sort }}"]:
        with pytest.raises(ChatTemplateError, match="failed on these messages"):
            ChatTemplate(source).render(USER)


def test_output_size_is_bounded():
    source = "{% for i in range(10000) %}{{ 'x' * 1000 }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=f"exceeds {MAX_OUTPUT_CHARS}"):
        ChatTemplate(source).render(USER)


DOUBLE = "{% set ns = namespace(s='xxxxxxxx', l=[1]) %}{% for i in range(64) %}{% set ns.s = EXPR %}{% endfor %}"
NEST = "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
SIZE_BOMBS = {
    "str repeat": "{{ 'x' * 10**9 }}",
    "str repeat reversed": "{{ 10**9 * 'x' }}",
    "list repeat": "{{ ([0] * 10**9) | length }}",
    "ljust": "{{ 'x'.ljust(10**10) }}",
    "center method": "{{ 'x'.center(10**10) }}",
    "zfill": "{{ '1'.zfill(10**10) }}",
    "center filter": "{{ 'x' | center(10**10) }}",
    "indent filter": "{{ 'a\nb' | indent(10**10) }}",
    "printf width": "{{ '%999999999d' % 1 }}",
    "printf star": "{{ '%*d' % (10**9, 1) }}",
    "printf precision": "{{ '%.999999999f' % 1.0 }}",
    "format filter": "{{ '%999999999s' | format('x') }}",
    "str.format width": "{{ '{:>999999999}'.format('x') }}",
    "str.format nested width": "{{ '{:>{}}'.format('x', 10**9) }}",
    "power": "{{ 2 ** (10 ** 9) }}",
    "range": "{{ range(10**6) | list | length }}",
    "doubling ~": DOUBLE.replace("EXPR", "ns.s ~ ns.s"),
    "doubling +": DOUBLE.replace("EXPR", "ns.s + ns.s"),
    "doubling join": DOUBLE.replace("EXPR", "[ns.s, ns.s] | join"),
    "doubling replace filter": DOUBLE.replace("EXPR", "ns.s | replace('x', 'xx')"),
    "doubling replace method": DOUBLE.replace("EXPR", "ns.s.replace('x', 'xx')"),
    "doubling format": DOUBLE.replace("EXPR", "'%s%s' % (ns.s, ns.s)"),
    "doubling list +": DOUBLE.replace("EXPR", "ns.s").replace("ns.s = ns.s", "ns.l = ns.l + ns.l"),
    "nested print": NEST + "{{ ns.l }}",
    "nested string filter": NEST + "{{ ns.l | string | length }}",
    "nested tojson": NEST + "{{ ns.l | tojson | length }}",
    "nested concat": NEST + "{{ ('a' ~ ns.l) | length }}",
    "nested printf": NEST + "{{ ('%s' % (ns.l,)) | length }}",
    "nested str.format": NEST + "{{ '{}'.format(ns.l) | length }}",
    "nested namespace print": NEST + "{{ ns }}",
    "nested join": NEST + "{{ ns.l | join(',') | length }}",
}


@pytest.mark.parametrize("name", sorted(SIZE_BOMBS))
def test_size_bombs_fail_fast_without_allocating(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # No short time limit to hide behind: the size guards must refuse the bomb before it does the work.
    with thread_cpu_seconds() as cpu, pytest.raises(ChatTemplateError) as err:
        ChatTemplate(SIZE_BOMBS[name], timeout_secs=HANG_GUARD_SECS).render(USER)
    assert "longer than" not in str(err.value), err.value
    assert cpu.seconds < BOMB_CPU_SECS
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, f"peak memory grew by {grown_mb:.0f} MB"


SLOW = {
    "nested ranges": "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "nested messages": "{% for a in messages %}{% for b in messages %}{% for c in messages %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    # do_int catches ValueError: the time limit must not be swallowed by it.
    "inside a filter that catches": "{% for i in range(10000) %}{% for j in range(10000) %}{% set x = 'a' | int %}"
    "{% endfor %}{% endfor %}",
    "loop over a slow filter": "{% for i in range(10000) %}{% for j in range(10000) %}{{ '' | trim }}{% endfor %}"
    "{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(SLOW))
def test_long_renders_stop_at_the_time_limit(name):
    messages = USER * 1000
    # Each of these runs for minutes unless stopped; the limit is wall time, so the thread's CPU time up to the
    # stop is at most the limit (less on a busy machine) plus the cost of noticing it.
    with thread_cpu_seconds() as cpu, pytest.raises(ChatTemplateError, match="longer than"):
        ChatTemplate(SLOW[name], timeout_secs=FAST).render(messages)
    assert cpu.seconds < FAST + STOP_CPU_SECS


@pytest.mark.parametrize(
    "source",
    [
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    ],
)
def test_unbounded_recursion(source):
    with pytest.raises(ChatTemplateError, match="RecursionError"):
        ChatTemplate(source, timeout_secs=5).render(USER)


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ().__class__.__base__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{{ strftime_now.__globals__['sys'] }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ lipsum.__globals__ }}",
        "{{ namespace.__init__ }}",
        "{{ messages[0].__class__ }}",
        "{{ messages[0].items.__self__ }}",
        "{{ messages.append(1) }}",
        "{% set x = messages.pop() %}",
        "{{ messages[0].update({'role': 'system'}) }}",
        "{{ messages[0].clear() }}",
        "{{ self.__init__ }}",
        "{{ range.__globals__ }}",
    ],
)
def test_sandbox_blocks_internals_and_mutation(source):
    with pytest.raises(ChatTemplateError) as err:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert "<class" not in str(err.value) and "<module" not in str(err.value)


def test_the_render_leaves_the_tracer_as_it_found_it():
    def other(frame, event, arg):
        return None

    previous = sys.gettrace()
    sys.settrace(other)
    try:
        ChatTemplate(CHATML).render(USER)
        assert sys.gettrace() is other
        with pytest.raises(ChatTemplateError):
            ChatTemplate(SLOW["nested ranges"], timeout_secs=0.05).render(USER)
        assert sys.gettrace() is other
    finally:
        sys.settrace(previous)
