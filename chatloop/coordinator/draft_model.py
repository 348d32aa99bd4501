"""A draft model: a small GGUF with the served model's vocabulary, run in the coordinator process through the
project's own engine, whose greedy continuation is the proposal (speculative method ``draft``).

The draft keeps one KV sequence per generating sequence. Before each proposal it drops what it holds past the
tokens the sequence really has (its rejected proposals: the runtime's rewind, ``seq_rm`` from the step's position),
feeds the new ones, then decodes ``k`` greedy tokens one row at a time. It runs on its own worker thread (the
engine's thread rule, docs/design.md), so the event loop only waits for it.

A draft whose vocabulary differs from the served model's (size, or the bytes of any token) is refused when the
coordinator starts: its token ids would mean other text.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np

from chatloop.engine.errors import StepRefused
from chatloop.engine.runtime import RuntimeOptions, StageRole, StageRuntime
from chatloop.engine.tokenizer import Tokenizer
from chatloop.protocol.messages import SeqStep

log = logging.getLogger(__name__)


class DraftModelError(RuntimeError):
    """The draft model cannot serve as one for this model (a different vocabulary, an unloadable file)."""


def check_vocabulary(draft: Tokenizer, served: Tokenizer, path: pathlib.Path) -> None:
    """Raise ``DraftModelError`` naming the first difference between the two vocabularies."""
    if draft.n_vocab != served.n_vocab:
        raise DraftModelError(
            f"draft model {path.name} has a vocabulary of {draft.n_vocab} tokens, the served model {served.n_vocab}: "
            "a draft must share the served model's vocabulary"
        )
    for token in range(served.n_vocab):
        if draft.piece(token) != served.piece(token):
            raise DraftModelError(
                f"draft model {path.name}: token {token} is {draft.piece(token)!r}, in the served model "
                f"{served.piece(token)!r}: a draft must share the served model's vocabulary"
            )


class DraftModel:
    source = "draft"

    def __init__(self, path: str | pathlib.Path, served: Tokenizer, threads: int = 1, max_sequences: int = 16) -> None:
        """Load ``path`` and check its vocabulary against ``served``; ``DraftModelError`` when it does not fit."""
        self.path = pathlib.Path(path)
        try:
            vocab = Tokenizer(self.path)
        except Exception as exc:  # noqa: BLE001 - any load failure is a refusal naming the file
            raise DraftModelError(f"draft model {self.path}: cannot load it ({exc})") from None
        try:
            check_vocabulary(vocab, served, self.path)
        finally:
            vocab.close()
        opts = RuntimeOptions(n_threads=threads, kv_cache_mb=256, max_sequences=max_sequences)
        self.runtime = StageRuntime(self.path, StageRole(first=True, last=True), opts)
        self._fed: dict[int, list[int]] = {}  # per sequence: the tokens the draft's KV holds, position by position

    def close(self) -> None:
        self.runtime.close()

    async def propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        """The draft's greedy continuation of ``tokens`` (up to ``k`` tokens; [] when it has no room)."""
        return await self.runtime.call(self._propose, seq_id, tokens, k)

    async def release(self, seq_id: int) -> None:
        await self.runtime.call(self._release, seq_id)

    def _release(self, seq_id: int) -> None:
        self._fed.pop(seq_id, None)
        self.runtime.release(seq_id)

    def _propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        """Worker thread: rewind to the tokens the sequence shares with what the draft holds, feed the rest, draft."""
        fed = self._fed.get(seq_id, [])
        same = 0
        limit = min(len(fed), len(tokens) - 1)  # at least the last token is fed: the first proposal is sampled there
        while same < limit and fed[same] == tokens[same]:
            same += 1
        out: list[int] = []
        try:
            step = SeqStep(seq_id, same, len(tokens) - same, sample=True)
            out.append(self.runtime.forward([step], self._ids(tokens[same:]))[0].token)
            while len(out) < k:
                step = SeqStep(seq_id, len(tokens) + len(out) - 1, 1, sample=True)
                out.append(self.runtime.forward([step], self._ids(out[-1:]))[0].token)
        except StepRefused as exc:  # no slot or no room left: no proposals (the sequence simply decodes)
            log.debug("draft model: no proposal for sequence %d: %s", seq_id, exc)
            self._release(seq_id)
            return []
        self._fed[seq_id] = tokens + out[:-1]
        return out

    @staticmethod
    def _ids(tokens: list[int]) -> np.ndarray:
        return np.asarray(tokens, dtype=np.int32)
