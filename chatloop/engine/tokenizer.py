"""The model's tokenizer, from a stage file's vocabulary (loaded with ``vocab_only``: no weights)."""

from __future__ import annotations

import ctypes
import pathlib

import llama_cpp as llama

from chatloop.engine.handles import Model


class Tokenizer:
    def __init__(self, path: str | pathlib.Path) -> None:
        self.model = Model(path, vocab_only=True)
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab
        self.bos = llama.llama_vocab_bos(self.vocab)
        self.eos = llama.llama_vocab_eos(self.vocab)
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self.vocab))
        self._pieces: dict[int, bytes] = {}

    def close(self) -> None:
        self.model.close()

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS/EOS as the model asks, ``parse_special`` maps
        special-token text (``<|im_start|>``) to its id."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama.llama_token * cap)()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama.llama_token * cap)()
            n = llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise ValueError("text could not be tokenized")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens rendered as their text)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        out = buf.raw[:n]
        self._pieces[token] = out
        return out

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ``<|im_end|>`` and the like)."""
        return bool(llama.llama_vocab_is_eog(self.vocab, token))

    def is_control(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_control(self.vocab, token))

    def chat_template(self) -> str | None:
        return self.model.chat_template()

    def token_text(self, token: int) -> str:
        return self.piece(token).decode("utf-8", "replace")
