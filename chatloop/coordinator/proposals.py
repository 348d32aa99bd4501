"""Prompt lookup: proposed next tokens from the sequence's own history (prompt and text so far), no extra model.

The longest suffix of the history (``n_max`` down to ``n_min`` tokens) that occurred before is looked up; the tokens
that followed its most recent earlier occurrence are the proposal. This is the method of llama.cpp's lookup
decoding (``common/ngram-cache``, examples/lookup) and of vLLM's ``ngram`` speculative method (``prompt_lookup_max``
/ ``prompt_lookup_min``). It pays off when the output repeats the input: editing, summarising, code, answers
quoted from a document. The verifying stage decides what is kept (docs/design.md, "Speculative decoding").

The index is incremental: each n-gram (``n_min`` .. ``n_max`` tokens) that has a successor maps to the position
after its latest occurrence, so a lookup costs ``n_max - n_min + 1`` dictionary probes, however long the history.
"""

from __future__ import annotations

from collections.abc import Sequence


class PromptLookup:
    """Proposals for one sequence; ``propose(tokens, k)`` with the sequence's growing token list."""

    source = "ngram"

    def __init__(self, n_min: int = 2, n_max: int = 4) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_min = n_min
        self.n_max = n_max
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> position right after its latest indexed occurrence
        self._indexed = 0  # n-grams ending before this position have been indexed

    def _index(self, tokens: Sequence[int]) -> None:
        """Index every n-gram that ends before the last token (so that it has a successor)."""
        end = len(tokens) - 1
        for stop in range(max(self._indexed, self.n_min), end + 1):
            for n in range(self.n_min, min(self.n_max, stop) + 1):
                self._next[tuple(tokens[stop - n : stop])] = stop
        self._indexed = max(self._indexed, end + 1)

    def forget(self) -> None:
        """Drop the index (the token list was replaced, not extended)."""
        self._next.clear()
        self._indexed = 0

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest earlier occurrence of the history's suffix; [] for none.

        ``tokens`` must extend the list of the previous call (the sequence only grows)."""
        if k <= 0 or len(tokens) < self.n_min + 1:
            return []
        self._index(tokens)
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            start = self._next.get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                # NOTE: a continuation may run into the suffix itself (a repeating pattern): that is a fine guess.
                return list(tokens[start : start + k])
        return []
