"""GBNF grammars in a sampler chain: llama.cpp's grammar sampler, built with errors that say what was wrong.

Where the grammar goes: llama.cpp's ``common_sampler`` (common/sampling.cpp) keeps the grammar sampler apart
from the chain and applies it before the other samplers (``grammar_first``), or, by default, samples without
it and re-samples with it first when the pick breaks the grammar. Both are here:

- ``add_grammar`` makes the grammar the first element of a chain: every later sampler (penalties, top-k,
  temperature, greedy, dist) only sees tokens the grammar allows, and ``llama_sampler_sample`` accepts the
  picked token into the grammar too. Simple, but one grammar pass over the whole vocabulary per token.
- ``GrammarSampler`` is llama-server's default: pick with the chain alone, ask the grammar about that one
  token, and only when it refuses, apply the grammar to the whole vocabulary and pick again. The result is
  the same (greedy: the best allowed token either way; random: drawing, then redrawing from the allowed
  tokens, gives each allowed token probability p / p(allowed)), and most tokens cost one check instead of a
  pass. ``scripts/bench_grammar.py`` measures both against no grammar.

Lazy grammars (``llama_sampler_init_grammar_lazy_patterns``, what llama-server uses for ``tool_choice: auto``)
leave the output free until a trigger (a regex over the generated text, or a token such as ``<tool_call>``)
appears, then constrain from the trigger on: the text before it stays free prose.

Hazards handled here, because llama.cpp handles them by ending the process: accepting a token the grammar
does not allow throws a C++ exception through the C API (``std::terminate``), and an end-of-generation token
before the grammar is complete hits ``GGML_ABORT``. ``accept_checked`` asks the grammar first.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence

import llama_cpp as llama
import numpy as np

from chatloop.engine.handles import Sampler
from chatloop.engine.native import ensure_backend

log = logging.getLogger(__name__)

GRAMMAR_ROOT = "root"
# Bounds on what reaches llama.cpp's recursive-descent parser: deep nesting recurses in C++ (a stack overflow
# kills the process) and a long grammar costs parse time on the event loop that checks it.
MAX_GRAMMAR_CHARS = 128 * 1024  # NOTE: the grammar travels in a frame header of at most 1 MiB (wire.py)
MAX_GRAMMAR_NESTING = 64
MAX_GRAMMAR_RULES = 4096

_lock = threading.Lock()  # llama.cpp's log callback and fd 2 are process-wide
_RULE_DEF = re.compile(r"^[ \t]*([a-zA-Z0-9-]+)[ \t]*::=", re.MULTILINE)


class GrammarError(ValueError):
    """A grammar llama.cpp refuses; the message names the problem as llama.cpp reported it."""


def _scan(gbnf: str) -> None:
    """Cheap checks before llama.cpp sees the text: size, rule count and parenthesis depth."""
    if not isinstance(gbnf, str):
        raise GrammarError("a grammar must be a string of GBNF rules")
    if not gbnf.strip():
        raise GrammarError("the grammar is empty")
    if "\x00" in gbnf:
        raise GrammarError("the grammar contains a NUL character")
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the grammar has {len(gbnf)} characters; at most {MAX_GRAMMAR_CHARS} are accepted")
    n_rules = len(_RULE_DEF.findall(gbnf))
    if n_rules > MAX_GRAMMAR_RULES:
        raise GrammarError(f"the grammar has {n_rules} rules; at most {MAX_GRAMMAR_RULES} are accepted")
    depth = deepest = 0
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c == "#":  # comment to end of line
            while i < n and gbnf[i] not in "\r\n":
                i += 1
        elif c in '"[':  # a literal or a character class: parentheses inside are characters
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    if deepest > MAX_GRAMMAR_NESTING:
        raise GrammarError(f"the grammar nests parentheses {deepest} deep; at most {MAX_GRAMMAR_NESTING} are accepted")


@contextlib.contextmanager
def _capture_llama_output() -> Iterator[list[str]]:
    """Collect what llama.cpp says while the block runs: its log callback (``failed to parse grammar``,
    ``left recursion detected``) and its stderr, where the grammar parser writes the position of a syntax
    error with ``fprintf``. NOTE: fd 2 is process-wide; for the microseconds of a parse, other threads'
    stderr lines land in the capture too and are written back afterwards."""
    lines: list[str] = []

    def on_log(level, text, user_data) -> None:
        lines.append(text.decode("utf-8", "replace"))

    callback = llama.llama_log_callback(on_log)
    prev_cb = llama.llama_log_callback()
    prev_data = ctypes.c_void_p()
    with _lock, tempfile.TemporaryFile() as sink:
        llama.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_data))
        sys.stderr.flush()
        saved_fd = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            llama.llama_log_set(callback, None)
            try:
                yield lines
            finally:
                llama.llama_log_set(prev_cb, prev_data)
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            sink.seek(0)
            raw = sink.read().decode("utf-8", "replace")
            parser_part, other = _split_parser_output(raw)
            if other:
                os.write(2, other.encode())
            lines[:0] = parser_part


def _split_parser_output(raw: str) -> tuple[list[str], str]:
    """The grammar parser's own message (``parse: error parsing grammar: ...`` followed by the rest of the
    grammar text) apart from anything else that reached stderr meanwhile."""
    idx = raw.find("error parsing grammar")
    if idx < 0:
        return [], raw
    start = raw.rfind("\n", 0, idx) + 1
    first_line = raw[start:].split("\n", 1)[0]
    return [first_line], raw[:start]


def _message(lines: list[str]) -> str:
    """llama.cpp's lines, trimmed to the informative ones (the parser echoes the rest of the grammar)."""
    useful = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        line = re.sub(r"^(llama_grammar_parser::)?parse: ", "", line)
        if len(line) > 200:
            line = line[:200] + "..."
        if line not in useful:
            useful.append(line)
    return "; ".join(useful) or "llama.cpp could not build it"


def _make(
    vocab,
    gbnf: str,
    root: str,
    trigger_patterns: Sequence[str] = (),
    trigger_tokens: Sequence[int] = (),
    lazy: bool = False,
):
    """A new grammar sampler (owned by the caller until added to a chain), or GrammarError."""
    _scan(gbnf)
    if not re.fullmatch(r"[a-zA-Z0-9-]+", root):
        raise GrammarError(f"grammar root {root!r} is not a rule name")
    ensure_backend()
    with _capture_llama_output() as lines:
        if lazy:
            pats = [p.encode() for p in trigger_patterns]
            pat_arr = (ctypes.c_char_p * max(len(pats), 1))(*pats)
            tok_arr = (llama.llama_token * max(len(trigger_tokens), 1))(*trigger_tokens)
            smpl = llama.llama_sampler_init_grammar_lazy_patterns(
                vocab, gbnf.encode(), root.encode(), pat_arr, len(pats), tok_arr, len(trigger_tokens)
            )
        else:
            smpl = llama.llama_sampler_init_grammar(vocab, gbnf.encode(), root.encode())
    if not smpl:
        raise GrammarError(f"invalid grammar: {_message(lines)}")
    return smpl


def check_grammar(gbnf: str, vocab=None, root: str = GRAMMAR_ROOT) -> None:
    """Raise GrammarError unless llama.cpp accepts ``gbnf``. ``vocab`` (a ``llama_vocab`` pointer, e.g. the
    coordinator's vocab-only ``Tokenizer.vocab``) is needed only for ``<token>`` references; without it, the
    parser checks everything else and refuses those. No weights are needed either way."""
    smpl = _make(vocab, gbnf, root)
    llama.llama_sampler_free(smpl)


def add_grammar(
    chain: Sampler,
    vocab,
    gbnf: str,
    *,
    root: str = GRAMMAR_ROOT,
    trigger_patterns: Sequence[str] = (),
    trigger_tokens: Sequence[int] = (),
) -> None:
    """Put llama.cpp's grammar sampler for ``gbnf`` into ``chain``, which must still be empty.

    NOTE: the grammar goes first so every later sampler only sees tokens it allows (see the module notes).
    With ``trigger_patterns`` or ``trigger_tokens`` the grammar is lazy: free text until a trigger matches.
    """
    if llama.llama_sampler_chain_n(chain.handle) != 0:
        raise ValueError("the grammar must be the first sampler of a chain: add it before any other")
    lazy = bool(trigger_patterns or trigger_tokens)
    for p in trigger_patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise GrammarError(f"grammar trigger pattern {p[:80]!r} is not a regular expression: {exc}") from None
    chain.add(_make(vocab, gbnf, root, trigger_patterns, trigger_tokens, lazy=lazy))
    chain.has_grammar = True


def _grammar_of(chain: Sampler):
    if not chain.has_grammar:
        return None
    return llama.llama_sampler_chain_get(chain.handle, 0)


def grammar_allows(chain: Sampler, token: int) -> bool:
    """Whether the chain's grammar lets ``token`` come next (True for a chain without a grammar).

    The same one-token check ``common_sampler_sample`` uses for its rejection sampling: the grammar sets the
    logit of a token it refuses to -inf. An end-of-generation token passes only once the grammar is complete.
    """
    if isinstance(chain, GrammarSampler):
        return chain.allows(token)
    grammar = _grammar_of(chain)
    if grammar is None:
        return True
    data = llama.llama_token_data(id=int(token), logit=1.0, p=0.0)
    arr = llama.llama_token_data_array(data=ctypes.pointer(data), size=1, selected=-1, sorted=False)
    llama.llama_sampler_apply(grammar, ctypes.byref(arr))
    return not math.isinf(data.logit)


def accept_checked(chain: Sampler, token: int) -> None:
    """Feed ``token`` to the chain (a replayed history after failover), refusing one its grammar does not
    allow, which llama.cpp would answer by ending the process."""
    if not grammar_allows(chain, token):
        raise GrammarError(f"token {token} does not fit the sequence's grammar at this point")
    chain.accept(token)


_CANDIDATE = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data, 12 bytes


class GrammarSampler(Sampler):
    """A sampler chain (the usual samplers, added with ``add``) with a grammar checked after the pick.

    Drop-in for ``Sampler``: ``sample(ctx, row)`` returns a token the grammar allows and accepts it into both;
    ``accept(token)`` (a replayed history) refuses a token the grammar does not allow with a GrammarError.
    """

    def __init__(
        self,
        vocab,
        n_vocab: int,
        gbnf: str,
        *,
        root: str = GRAMMAR_ROOT,
        trigger_patterns: Sequence[str] = (),
        trigger_tokens: Sequence[int] = (),
    ) -> None:
        super().__init__()
        try:
            lazy = bool(trigger_patterns or trigger_tokens)
            self.grammar = _make(vocab, gbnf, root, trigger_patterns, trigger_tokens, lazy=lazy)
        except BaseException:
            self.close()
            raise
        self._stack.callback(llama.llama_sampler_free, self.grammar)
        self.n_vocab = n_vocab
        self._cand = np.zeros(n_vocab, dtype=_CANDIDATE)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._ptr = self._cand.ctypes.data_as(ctypes.POINTER(llama.llama_token_data))
        self.resampled = 0  # picks the grammar refused (for benchmarks and tests)

    def _candidates(self, ctx, row: int) -> llama.llama_token_data_array:
        ptr = llama.llama_get_logits_ith(ctx.handle, row)
        if not ptr:
            raise RuntimeError(f"no logits for batch row {row}")
        self._cand["id"] = self._ids
        self._cand["logit"] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        self._cand["p"] = 0.0
        return llama.llama_token_data_array(data=self._ptr, size=self.n_vocab, selected=-1, sorted=False)

    def allows(self, token: int) -> bool:
        data = llama.llama_token_data(id=int(token), logit=1.0, p=0.0)
        arr = llama.llama_token_data_array(data=ctypes.pointer(data), size=1, selected=-1, sorted=False)
        llama.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return not math.isinf(data.logit)

    def _pick(self, arr: llama.llama_token_data_array) -> int:
        if not 0 <= arr.selected < arr.size:
            raise RuntimeError("the sampler chain picked no token: it must end with greedy or dist")
        return int(arr.data[arr.selected].id)

    def sample(self, ctx, row: int) -> int:
        arr = self._candidates(ctx, row)
        llama.llama_sampler_apply(self.handle, ctypes.byref(arr))
        token = self._pick(arr)
        if not self.allows(token):
            self.resampled += 1
            arr = self._candidates(ctx, row)
            # NOTE: the grammar first, then the chain: every later sampler only sees allowed tokens.
            llama.llama_sampler_apply(self.grammar, ctypes.byref(arr))
            llama.llama_sampler_apply(self.handle, ctypes.byref(arr))
            token = self._pick(arr)
            if not self.allows(token):  # no token fits: llama.cpp would end the process on accepting one
                raise GrammarError("no token of the vocabulary can continue the grammar here")
        llama.llama_sampler_accept(self.grammar, token)
        llama.llama_sampler_accept(self.handle, token)
        return token

    def accept(self, token: int) -> None:
        if not self.allows(token):
            raise GrammarError(f"token {token} does not fit the sequence's grammar at this point")
        llama.llama_sampler_accept(self.grammar, token)
        llama.llama_sampler_accept(self.handle, token)
