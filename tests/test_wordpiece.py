"""The pure-Python WordPiece tokenizer gives exactly the ids ``tokenizers`` gives.

all-MiniLM-L6-v2's own ``tokenizer.json`` (from the exported model's metadata) is run by
both on a varied corpus, and on every code point of the first two Unicode planes, where
``tokenizers``' Unicode 8.0 tables and Python's newer ``unicodedata`` part ways.
"""

# The corpus is about look-alike characters (fullwidth letters, dashes, accents).
# ruff: noqa: RUF001

from __future__ import annotations

import json
import time
import unicodedata
from typing import Any

import onnx
import pytest

from edgeos.demo.knowledge import NOTES, PARAPHRASES
from edgeos.memory.embeddings import TOKENIZER_KEY, HuggingFaceTokenizer
from edgeos.memory.export import MINILM_MAX_TOKENS
from edgeos.memory.wordpiece import WordPieceTokenizer, from_config
from tests.memory_support import minilm_model
from tests.test_memory_embeddings import SENTENCES

pytest.importorskip("tokenizers", reason="the reference: pip install 'edgeos[memory]'")

CORPUS = [
    *SENTENCES,
    *(note.text for note in NOTES),
    *PARAPHRASES,
    "",
    " ",
    "\t\n\r  ",
    "Café déjà vu: naïve façade, Ångström, São Paulo, İstanbul, ΑΣ ΟΔΟΣ, Straße",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and ﬁ ligatures, ① ² ½",
    "中文分词测试：我们的商店在北京。日本語のテキスト、한국어 텍스트",
    "mixed中文english混合text",
    "punctuation!!! (brackets) [square] {curly} <angle> 'quotes' \"double\" «guillemets» — dash… end.",
    "symbols $5 + 3 = 8 ^ ` | ~ @ # % & * _ \\ / € £ ¥ ° ± × ÷",
    "emoji 😀 🥰 👍🏽 👨‍👩‍👧 🇫🇷 ❤️ and text",
    "zero\u200bwidth\u200c joiner\u200d soft\u00adhyphen \ufeffbom \ufffdreplacement \x00nul \x07bell",
    "no\u00a0break\u2003em\u3000ideographic\u2028line\x85next\x1cfile\x0bvt\x0cff",
    "combining e\u0301 a\u0308 n\u0303 and precomposed é ä ñ, Hangul 한 and jamo \u1112\u1161\u11ab",
    "special tokens in text: [CLS] [SEP] [PAD] [UNK] [MASK] [cls] [SEP][SEP]x[MASK]y",
    "a" * 100,
    "b" * 101,
    "supercalifragilisticexpialidocious antidisestablishmentarianism " * 3,
    "x" * 250 + " unknownword " + "é" * 99,
    "SKU-0042 reorder qty=17 at 09:30, fill-rate 0.85 (Acme) #urgent http://example.com/a?b=c",
    "word " * 400,  # truncated to 256 tokens with [CLS] and [SEP]
    "日本" * 200,
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ œ∑´®†¥¨ˆøπ“‘ ¡™£¢∞§¶•ªº–≠",
    "\u0378\u0379 unassigned \U000e0001 tag \U0010fffd private \ue000 use",
    "\u061d arabic end of text mark \u07fd \U000111c9 \u166d \u1734 newer characters",
]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> str:
    model = onnx.load(minilm_model(tmp_path_factory.mktemp("minilm")), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return str(json.loads(meta[TOKENIZER_KEY])["config"])


@pytest.fixture(scope="module")
def ours(config: str) -> WordPieceTokenizer:
    tokenizer = from_config(json.loads(config), MINILM_MAX_TOKENS)
    assert tokenizer is not None, "all-MiniLM-L6-v2's tokenizer.json is BERT WordPiece"
    return tokenizer


@pytest.fixture(scope="module")
def reference(config: str) -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(config, MINILM_MAX_TOKENS, "all-minilm-l6-v2")


def test_the_corpus_gets_the_same_ids_and_mask(
    ours: WordPieceTokenizer, reference: HuggingFaceTokenizer
) -> None:
    for text in CORPUS:  # one by one: a difference names its text
        ids, mask = ours.encode([text])
        want_ids, want_mask = reference.encode([text])
        assert ids.tolist() == want_ids.tolist(), text
        assert mask.tolist() == want_mask.tolist(), text
    # Batched: padded to the longest text, with the same pad id and mask.
    ids, mask = ours.encode(CORPUS)
    want_ids, want_mask = reference.encode(CORPUS)
    assert ids.tolist() == want_ids.tolist()
    assert mask.tolist() == want_mask.tolist()
    assert ids.shape[1] == MINILM_MAX_TOKENS  # "word " * 400 was truncated


def test_every_code_point_of_the_first_two_planes_is_treated_alike(
    ours: WordPieceTokenizer, config: str
) -> None:
    # Each character alone, inside a word and after one: dropped, stripped, split off or
    # kept, as tokenizers does. Checked whole once (1,112,064 code points); here every code
    # point of the first two planes but letters without case, unassigned and private-use
    # ones (long runs treated alike: every 7th of them), plus the other planes' edges.
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(config)
    tokenizer.enable_truncation(max_length=MINILM_MAX_TOKENS)
    tokenizer.no_padding()
    edges = [0x2A6DF, 0x2A6E0, 0x2A700, 0x2B73F, 0x2B740, 0x2B81F, 0x2B820, 0x2B920, 0x2CEAF,
             0x2CEB0, 0x2F800, 0x2FA1F, 0x2FA20, 0x30000, 0xEFFFF, 0xF0000, 0xFFFFD, 0xFFFFE,
             0x100000, 0x10FFFD, 0x10FFFF, *range(0xE0000, 0xE0200)]  # fmt: skip
    runs = ("Lo", "Cn", "Co")
    chars = [
        chr(c) for c in range(0x20000)
        if not 0xD800 <= c <= 0xDFFF and (c % 7 == 0 or unicodedata.category(chr(c)) not in runs)
    ] + [chr(c) for c in edges]  # fmt: skip
    texts = [f"x{c}y {c} A{c}" for c in chars]
    want = [e.ids for e in tokenizer.encode_batch(texts)]
    wrong = [
        f"U+{ord(c):04X}" for c, text, ids in zip(chars, texts, want, strict=True)
        if ours.ids(text) != ids
    ]  # fmt: skip
    assert not wrong, f"{len(wrong)} code points differ, first {wrong[:10]}"


def test_a_file_that_is_not_bert_wordpiece_is_left_to_tokenizers(config: str) -> None:
    parsed: dict[str, Any] = json.loads(config)
    assert from_config({**parsed, "model": {**parsed["model"], "type": "BPE"}}, 64) is None
    assert from_config({**parsed, "normalizer": {"type": "NFKC"}}, 64) is None
    assert from_config({**parsed, "post_processor": {"type": "RobertaProcessing"}}, 64) is None
    stripping = [{**parsed["added_tokens"][0], "lstrip": True}]
    assert from_config({**parsed, "added_tokens": stripping}, 64) is None


def test_it_is_fast_enough_next_to_tokenizers(
    ours: WordPieceTokenizer, reference: HuggingFaceTokenizer
) -> None:
    texts = [note.text for note in NOTES] * 20
    timings = {}
    for name, tokenizer in (("wordpiece", ours), ("tokenizers", reference)):
        started = time.perf_counter()
        for start in range(0, len(texts), 32):
            tokenizer.encode(texts[start : start + 32])
        timings[name] = (time.perf_counter() - started) / len(texts)
    print(f"per text: wordpiece {timings['wordpiece'] * 1e6:.0f} us, "
          f"tokenizers {timings['tokenizers'] * 1e6:.0f} us")  # fmt: skip
    # A text of the demo embeds in milliseconds; tokenizing it must stay well below that.
    assert timings["wordpiece"] < 200e-6
