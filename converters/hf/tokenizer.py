"""The model's tokenizer as GGUF metadata, read from the HF folder without ``transformers``.

Two kinds, as in llama.cpp's ``convert_hf_to_gguf.py`` (``_set_vocab_sentencepiece`` then
``_set_vocab_gpt2``):

- SentencePiece ``tokenizer.model`` (Llama 2 style): pieces, scores and types, parsed from the protobuf
  directly (the ``sentencepiece`` package is not needed).
- ``tokenizer.json`` byte-level BPE (GPT-2 style): tokens, merges, token types and ``tokenizer.ggml.pre``,
  the name of the pre-tokenizer llama.cpp must apply. llama.cpp's converter finds that name by hashing the
  output of the model's own tokenizer on a probe text; without ``transformers`` we read the pre-tokenizer
  definition instead and match it against the regexes llama.cpp implements (``src/llama-vocab.cpp``).

Special tokens, add_bos/add_eos, merges and the chat template come through ``gguf.SpecialVocab``, the same
reader llama.cpp's converter uses.
"""

from __future__ import annotations

import json
import logging
import pathlib
import struct
from dataclasses import dataclass

import gguf

from converters.errors import ConvertError

log = logging.getLogger(__name__)

# Pre-tokenizer regexes as they appear in tokenizer.json, and the llama.cpp pre-tokenizer that reproduces
# each one: llama-vocab.cpp's ``llm_tokenizer_bpe`` keeps each original regex in a comment next to the
# adapted copy it runs (LLAMA3 for "llama-bpe", QWEN2, TEKKEN, GPT2 for "gpt-2").
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The regex the ``tokenizers`` ByteLevel pre-tokenizer applies with use_regex=true (GPT-2's).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_REGEX_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2", TEKKEN_REGEX: "tekken", GPT2_REGEX: "gpt-2"}
FALLBACK_PRE = "gpt-2"


@dataclass
class Vocab:
    """Everything of the tokenizer that goes into the GGUF."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str | bytes]
    types: list[int]  # gguf.TokenType per token
    scores: list[float] | None = None  # SentencePiece only
    special: gguf.SpecialVocab | None = None  # special ids, add_bos/add_eos, merges, chat template
    add_space_prefix: bool | None = None  # tokenizer_config.json's add_prefix_space, when given

    def add_to_gguf(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.special is not None:
            self.special.add_to_gguf(w, quiet=True)


def load_vocab(folder: pathlib.Path, vocab_size: int) -> Vocab:
    """Read the folder's tokenizer, padded or checked against the model's ``vocab_size``."""
    config = read_json_object(folder / "tokenizer_config.json") or {}
    spm = folder / "tokenizer.model"
    vocab = None
    if spm.is_file():
        try:
            vocab = _sentencepiece_vocab(spm, folder, config, vocab_size)
        except _NotSentencePiece as exc:
            # Llama 3 repos carry a tiktoken file under this name; tokenizer.json is the one to use then.
            if not (folder / "tokenizer.json").is_file():
                raise ConvertError(f"{spm}: not a SentencePiece model ({exc}) and no tokenizer.json") from exc
            log.info("%s is not a SentencePiece model (%s); using tokenizer.json", spm.name, exc)
    if vocab is None:
        vocab = _bpe_vocab(folder, config, vocab_size)
    if isinstance(config.get("add_prefix_space"), bool):
        vocab.add_space_prefix = config["add_prefix_space"]
    ids = vocab.special.special_token_ids if vocab.special else {}
    log.info(
        "tokenizer: %s (pre %s), %d tokens, special %s",
        vocab.model,
        vocab.pre,
        len(vocab.tokens),
        ", ".join(f"{k}={v}" for k, v in sorted(ids.items())) or "none",
    )
    return vocab


def read_json_object(path: pathlib.Path) -> dict | None:
    """A JSON object file of a model folder; None when the file is absent."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


def looks_special(text: str) -> bool:
    """Added tokens some models forget to flag as special (llama.cpp's ``does_token_look_special``)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _added_tokens(tok_json: dict, config: dict) -> dict[int, dict]:
    """Added tokens by id: tokenizer.json's list, completed by tokenizer_config.json's decoder table."""
    added: dict[int, dict] = {}
    for entry in tok_json.get("added_tokens") or []:
        added[int(entry["id"])] = entry
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        added.setdefault(int(key), entry)
    return added


# -- byte-level BPE (tokenizer.json) -------------------------------------------------------------------


def _bpe_vocab(folder: pathlib.Path, config: dict, vocab_size: int) -> Vocab:
    path = folder / "tokenizer.json"
    tok_json = read_json_object(path)
    if tok_json is None:
        raise ConvertError(f"{folder}: no tokenizer (expected tokenizer.json or tokenizer.model)")
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConvertError(
            f"{path}: tokenizer model {model.get('type')!r} is not supported "
            "(supported: byte-level BPE tokenizer.json, SentencePiece tokenizer.model)"
        )
    if not _is_byte_level(tok_json):
        raise ConvertError(
            f"{path}: a SentencePiece-style BPE (not byte-level) needs its tokenizer.model, which the folder lacks"
        )
    pre = detect_pre_tokenizer(tok_json.get("pre_tokenizer"), config)
    base: dict[str, int] = model["vocab"]
    added = _added_tokens(tok_json, config)
    top = max([*base.values(), *added.keys()], default=-1)
    if top >= vocab_size:
        raise ConvertError(f"{path}: token id {top} does not fit the model's vocab_size {vocab_size} (config.json)")
    reverse = {i: t for t, i in base.items()}
    tokens: list[str | bytes] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i in added:
            text = added[i]["content"]
            if added[i].get("special") or looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                # llama.cpp matches user-defined tokens on raw text: pre-normalize SentencePiece spaces.
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(text)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ConvertError(f"{path}: a BPE tokenizer without merges")
    # HF adds a BOS only through the post-processor's template (which SpecialVocab has read) or an explicit
    # add_bos_token; say so, rather than leave the choice to llama.cpp's per-pre-tokenizer default.
    special.add_special_token.setdefault("bos", False)
    return Vocab(model="gpt2", pre=pre, tokens=tokens, types=types, special=special)


def _is_byte_level(tok_json: dict) -> bool:
    def types_of(node) -> list[str]:
        if not isinstance(node, dict):
            return []
        inner = node.get("pretokenizers") or node.get("decoders") or []
        return [node.get("type", "")] + [t for n in inner for t in types_of(n)]

    return "ByteLevel" in types_of(tok_json.get("pre_tokenizer")) + types_of(tok_json.get("decoder"))


def _steps(pre_tokenizer) -> list[tuple]:
    """The pre-tokenizer as a flat list of comparable steps."""
    if not isinstance(pre_tokenizer, dict):
        return []
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return [s for p in pre_tokenizer.get("pretokenizers") or [] for s in _steps(p)]
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern") or {}
        return [("split", pattern.get("Regex", pattern.get("String")), pre_tokenizer.get("invert", False))]
    if kind == "Digits":
        return [("digits", bool(pre_tokenizer.get("individual_digits")))]
    if kind == "ByteLevel":
        return [("bytelevel", pre_tokenizer.get("use_regex", True), pre_tokenizer.get("add_prefix_space", False))]
    return [(kind,)]


def detect_pre_tokenizer(pre_tokenizer, config: dict) -> str:
    """The ``tokenizer.ggml.pre`` name whose llama.cpp regexes split text as ``pre_tokenizer`` does."""
    steps = _steps(pre_tokenizer)
    if len(steps) == 2 and steps[0][0] == "split" and steps[1] == ("bytelevel", False, False) and not steps[0][2]:
        name = SPLIT_REGEX_PRE.get(steps[0][1])
        if name:
            return name
    if steps == [("bytelevel", True, False)]:
        return "gpt-2"
    if steps == [("digits", True), ("bytelevel", True, False)]:
        # One llama.cpp regex set serves SmolLM and StarCoder; "smollm" also turns off the clean-up of spaces
        # before punctuation when decoding, as the model's tokenizer_config.json asks.
        return "starcoder" if config.get("clean_up_tokenization_spaces", False) else "smollm"
    summary = json.dumps(pre_tokenizer, ensure_ascii=False)
    summary = summary if len(summary) <= 300 else summary[:300] + "..."
    log.warning(
        "UNKNOWN PRE-TOKENIZER: llama.cpp has no pre-tokenizer known to match %s; falling back to %r. "
        "Text may be split differently from the model's own tokenizer: check the converted model's "
        "tokenization before trusting its output.",
        summary,
        FALLBACK_PRE,
    )
    return FALLBACK_PRE


# -- SentencePiece (tokenizer.model) ------------------------------------------------------------------


class _NotSentencePiece(ValueError):
    pass


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise _NotSentencePiece("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise _NotSentencePiece("bad varint")


def _fields(buf: bytes):
    """(field number, value) pairs of one protobuf message: ints for varints, bytes for the rest."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise _NotSentencePiece(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise _NotSentencePiece("truncated message")
        yield num, value


def parse_sentencepiece(data: bytes) -> tuple[list[bytes], list[float], list[int], int]:
    """Pieces, scores, types and model type of a ``sentencepiece_model.proto`` ModelProto.

    ModelProto: ``repeated SentencePiece pieces = 1``, ``TrainerSpec trainer_spec = 2`` (``model_type = 3``:
    1 unigram, 2 BPE). SentencePiece: ``piece = 1`` (string), ``score = 2`` (float), ``type = 3`` (enum whose
    values equal ``gguf.TokenType``, default NORMAL).
    """
    pieces: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    model_type = 1
    for num, value in _fields(data):
        if num == 1 and isinstance(value, bytes):
            piece, score, kind = b"", 0.0, 1
            for n, v in _fields(value):
                if n == 1 and isinstance(v, bytes):
                    piece = v
                elif n == 2 and isinstance(v, bytes) and len(v) == 4:
                    (score,) = struct.unpack("<f", v)
                elif n == 3 and isinstance(v, int):
                    kind = v
            pieces.append(piece)
            scores.append(score)
            types.append(kind if 1 <= kind <= 6 else 1)
        elif num == 2 and isinstance(value, bytes):
            for n, v in _fields(value):
                if n == 3 and isinstance(v, int):
                    model_type = v
    if not pieces:
        raise _NotSentencePiece("no pieces")
    return pieces, scores, types, model_type


def _sentencepiece_vocab(path: pathlib.Path, folder: pathlib.Path, config: dict, vocab_size: int) -> Vocab:
    pieces, scores, types, model_type = parse_sentencepiece(path.read_bytes())
    if model_type != 2:
        log.warning("%s: SentencePiece model type %d is not BPE; llama.cpp may tokenize differently", path, model_type)
    if len(pieces) > vocab_size:
        log.warning("%s: %d pieces but vocab_size %d; ignoring the rest", path, len(pieces), vocab_size)
    tokens: list[str | bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    out_scores = [-10000.0] * vocab_size
    out_types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i, (piece, score, kind) in enumerate(zip(pieces[:vocab_size], scores, types)):
        tokens[i], out_scores[i], out_types[i] = piece, score, kind
    # Added tokens as llama.cpp's _create_vocab_sentencepiece reads them: added_tokens.json, then the
    # tokenizer_config.json decoder table (which also says which ones are special).
    for text, tid in (read_json_object(folder / "added_tokens.json") or {}).items():
        if 0 <= int(tid) < vocab_size:
            tokens[tid], out_scores[tid], out_types[tid] = text.encode(), -1000.0, int(gguf.TokenType.USER_DEFINED)
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        tid, text = int(key), entry["content"]
        if not 0 <= tid < vocab_size:
            continue
        if entry.get("special") or looks_special(text):
            out_types[tid] = int(gguf.TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            out_types[tid] = int(gguf.TokenType.USER_DEFINED)
        tokens[tid], out_scores[tid] = text.encode(), -1000.0
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    return Vocab(model="llama", pre="default", tokens=tokens, types=out_types, scores=out_scores, special=special)
