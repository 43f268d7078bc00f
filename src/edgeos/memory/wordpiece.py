"""BERT's WordPiece tokenizer in pure Python, read from a Hugging Face ``tokenizer.json``.

It gives exactly the ids the ``tokenizers`` package gives for the same file (the tests
compare both on a varied corpus), without loading that package: a node embedding its
agents' memory with all-MiniLM-L6-v2 saves the ~14 MB resident the native library holds.
The steps are those of ``tokenizers``:

* special tokens (``[CLS]``, ``[SEP]``, ``[UNK]``, ...) written in the text are taken as
  they are, before anything else (leftmost, longest first);
* BERT normalization: clean the text (drop NUL, U+FFFD and control characters, whitespace
  to spaces), space out CJK ideographs, strip accents (NFD, nonspacing marks dropped) and
  lowercase, each character on its own;
* BERT pre-tokenization: split on whitespace, each punctuation character its own word;
* WordPiece: the longest piece of the vocabulary first, continuations with ``##``; a word
  longer than ``max_input_chars_per_word`` characters, or with a part no piece matches,
  is one ``[UNK]``;
* truncation to ``max_tokens`` including ``[CLS]`` and ``[SEP]``, then padding to the
  longest text of the batch with an attention mask.

Only what BERT-style files use is supported: :func:`from_config` returns None for anything
else, and the caller falls back on ``tokenizers`` itself.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgeos.memory import wordpiece_tables

# Characters Rust's ``char::is_whitespace`` accepts (Unicode White_Space); ``tokenizers``
# splits on these, not on Python's ``str.isspace`` (which adds U+001C..U+001F).
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# The CJK blocks BERT spaces out, one ideograph a word.
_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


class _Ranges:
    """Code points in a table of :mod:`.wordpiece_tables`."""

    def __init__(self, table: str) -> None:
        bounds = [[int(end, 16) for end in item.split("-")] for item in table.split()]
        self._lows = [b[0] for b in bounds]
        self._highs = [b[-1] for b in bounds]

    def __contains__(self, char: str) -> bool:
        i = bisect.bisect_right(self._lows, ord(char)) - 1
        return i >= 0 and ord(char) <= self._highs[i]


_OTHER = _Ranges(wordpiece_tables.OTHER)
_NONSPACING = _Ranges(wordpiece_tables.NONSPACING_MARKS)
_PUNCTUATION = _Ranges(wordpiece_tables.PUNCTUATION)


def _is_cjk(code: int) -> bool:
    return any(low <= code <= high for low, high in _CJK)


def _is_punctuation(char: str) -> bool:
    # ASCII punctuation includes symbols ($, +, <, ^, `, |, ~) Unicode files elsewhere.
    return (char.isascii() and not char.isalnum() and char.isprintable() and char != " ") or (
        char in _PUNCTUATION
    )


class _Table(dict[int, str]):
    """A ``str.translate`` table computed one character at a time, on first sight: text
    seen once costs a function call per new character, then a dictionary hit. At most
    :data:`_CACHED` characters are kept, so text running through all of Unicode cannot
    grow it without bound."""

    def __init__(self, rule: Callable[[str], str]) -> None:
        super().__init__()
        self._rule = rule

    def __missing__(self, code: int) -> str:
        value = self._rule(chr(code))
        if len(self) < _CACHED:
            self[code] = value
        return value


_CACHED = 8192


def _clean(char: str, *, clean_text: bool, chinese: bool) -> str:
    if clean_text:
        if char in "\t\n\r":
            return " "
        if char in "\x00\ufffd" or char in _OTHER:
            return ""
        if char in _WHITESPACE:
            return " "
    if chinese and _is_cjk(ord(char)):
        return f" {char} "
    return char


def _fold(char: str, *, strip_accents: bool, lowercase: bool) -> str:
    if strip_accents and char in _NONSPACING:
        return ""
    # Character by character, as tokenizers does: no final-sigma rule (str.lower has one).
    return char.lower() if lowercase else char


def _split(char: str) -> str:
    if char in _WHITESPACE:
        return " "
    if _is_punctuation(char):
        return f" {char} "
    return char


class WordPieceTokenizer:
    """BERT tokenization and WordPiece over a vocabulary; see the module's docstring."""

    def __init__(
        self,
        vocab: dict[str, int],
        *,
        max_tokens: int,
        unk_token: str = "[UNK]",
        prefix: str = "##",
        max_chars_per_word: int = 100,
        clean_text: bool = True,
        chinese_chars: bool = True,
        strip_accents: bool = True,
        lowercase: bool = True,
        specials: Mapping[str, int] | None = None,
        head: Sequence[int] = (),
        tail: Sequence[int] = (),
        pad_id: int = 0,
    ) -> None:
        """``specials``: tokens taken as they are where the text has them (the file's
        added tokens); ``head`` and ``tail``: ids around every text (``[CLS]``, ``[SEP]``);
        ``max_tokens`` counts them."""
        self._vocab = vocab  # not copied: 30,000 entries
        self._unk = self._vocab[unk_token]
        self._prefix = prefix
        self._max_chars = max_chars_per_word
        self._head, self._tail = list(head), list(tail)
        self._room = max(0, max_tokens - len(self._head) - len(self._tail))
        self._pad = pad_id
        self._specials = dict(specials or {})
        self._special_re = (
            re.compile(
                "|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True))
            )
            if self._specials
            else None
        )
        self._clean = _Table(lambda c: _clean(c, clean_text=clean_text, chinese=chinese_chars))
        self._nfd = strip_accents
        self._fold = _Table(lambda c: _fold(c, strip_accents=strip_accents, lowercase=lowercase))
        self._split = _Table(_split)

    def ids(self, text: str) -> list[int]:
        """Token ids of one text, truncated, with ``[CLS]`` and ``[SEP]`` around it."""
        out: list[int] = []
        if self._special_re is None:
            self._add_plain(text, out)
        else:
            start = 0
            for match in self._special_re.finditer(text):
                self._add_plain(text[start : match.start()], out)
                out.append(self._specials[match.group()])
                start = match.end()
            self._add_plain(text[start:], out)
        return [*self._head, *out[: self._room], *self._tail]

    def encode(self, texts: Sequence[str]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(input_ids, attention_mask) of ``texts``, padded to the longest, batch x tokens."""
        rows = [self.ids(text) for text in texts]
        width = max((len(row) for row in rows), default=0)
        ids = np.full((len(rows), width), self._pad, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def _add_plain(self, text: str, out: list[int]) -> None:
        text = text.translate(self._clean)
        if self._nfd and not text.isascii():
            text = unicodedata.normalize("NFD", text)
        text = text.translate(self._fold).translate(self._split)
        for word in text.split(" "):
            if len(out) >= self._room:
                return  # truncated past here anyway
            if word:
                self._add_word(word, out)

    def _add_word(self, word: str, out: list[int]) -> None:
        whole = self._vocab.get(word)
        if whole is not None:
            out.append(whole)
            return
        if len(word) > self._max_chars:
            out.append(self._unk)
            return
        pieces: list[int] = []
        start, end = 0, len(word)
        while start < end:
            stop = end
            while stop > start:
                piece = word[start:stop] if start == 0 else self._prefix + word[start:stop]
                found = self._vocab.get(piece)
                if found is not None:
                    pieces.append(found)
                    break
                stop -= 1
            else:
                out.append(self._unk)  # no piece fits: the whole word is unknown
                return
            start = stop
        out.extend(pieces)


def from_config(config: Mapping[str, Any], max_tokens: int) -> WordPieceTokenizer | None:
    """The tokenizer a parsed ``tokenizer.json`` describes, truncated to ``max_tokens``
    tokens; None when the file asks for anything but BERT-style WordPiece (its
    normalizer, pre-tokenizer, model, special tokens or their template)."""
    model = config.get("model") or {}
    normalizer = config.get("normalizer") or {}
    if (
        model.get("type") != "WordPiece"
        or normalizer.get("type") != "BertNormalizer"
        or (config.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer"
    ):
        return None
    vocab: dict[str, int] = model["vocab"]
    specials: dict[str, int] = {}
    for token in config.get("added_tokens") or []:
        # Tokens matched after normalization, or eating spaces around them, are not handled.
        if token.get("normalized") or token.get("lstrip") or token.get("rstrip"):
            return None
        if token.get("single_word"):
            return None
        specials[token["content"]] = int(token["id"])
    around = _template(config.get("post_processor"), {**vocab, **specials})
    unk = model.get("unk_token", "[UNK]")
    if around is None or unk not in vocab:
        return None
    lowercase = bool(normalizer.get("lowercase", True))
    strip = normalizer.get("strip_accents")
    return WordPieceTokenizer(
        vocab,
        max_tokens=max_tokens,
        unk_token=unk,
        prefix=model.get("continuing_subword_prefix", "##"),
        max_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
        clean_text=bool(normalizer.get("clean_text", True)),
        chinese_chars=bool(normalizer.get("handle_chinese_chars", True)),
        strip_accents=lowercase if strip is None else bool(strip),
        lowercase=lowercase,
        specials=specials,
        head=around[0],
        tail=around[1],
        pad_id=specials.get("[PAD]", vocab.get("[PAD]", 0)),
    )


def _template(
    processor: Mapping[str, Any] | None, ids: Mapping[str, int]
) -> tuple[list[int], list[int]] | None:
    """The ids a single text gets before and after it, or None for an unknown processor."""
    if processor is None:
        return [], []
    if processor.get("type") == "BertProcessing":
        return [int(processor["cls"][1])], [int(processor["sep"][1])]
    if processor.get("type") != "TemplateProcessing":
        return None
    special_ids = {
        name: [int(i) for i in token["ids"]]
        for name, token in (processor.get("special_tokens") or {}).items()
    }
    head: list[int] = []
    tail: list[int] = []
    seen_text = False
    for item in processor.get("single") or []:
        if "Sequence" in item:
            if seen_text or item["Sequence"].get("id") != "A":
                return None
            seen_text = True
        elif "SpecialToken" in item:
            name = item["SpecialToken"]["id"]
            found = special_ids.get(name) or ([ids[name]] if name in ids else None)
            if found is None:
                return None
            (tail if seen_text else head).extend(found)
        else:
            return None
    return (head, tail) if seen_text else None
