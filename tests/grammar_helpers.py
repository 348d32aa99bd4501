"""Holding a GBNF grammar to text with llama.cpp's own grammar engine: does the grammar accept this document?"""

from __future__ import annotations

from chatloop.engine.grammar import GrammarError, accept_checked, add_grammar, grammar_allows
from chatloop.engine.handles import Sampler
from chatloop.engine.tokenizer import Tokenizer


def accepts(tok: Tokenizer, gbnf: str, text: str, trigger_patterns: tuple[str, ...] = ()) -> bool:
    """True when ``text``, tokenized, walks through the grammar and the grammar may end right after it."""
    chain = Sampler()
    try:
        add_grammar(chain, tok.vocab, gbnf, trigger_patterns=trigger_patterns)
        for t in tok.tokenize(text, add_special=False, parse_special=False):
            try:
                accept_checked(chain, t)
            except GrammarError:
                return False
        return grammar_allows(chain, tok.eos)
    finally:
        chain.close()
