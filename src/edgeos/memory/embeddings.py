"""Text to unit vectors on the device, through a registered embedding model.

The model is an ordinary registered ONNX model run by the node's model host (so it gets
the host's quantization, profiling, metrics and memory budget like any other); what makes
it an embedding model is its metadata, written by :mod:`edgeos.memory.export`: the
tokenizer it was trained with (``edgeos.tokenizer``) and its dimension
(``edgeos.embedding``). Inputs ``input_ids`` and ``attention_mask`` (int64, batch x tokens),
output ``embedding`` (float32, batch x dim, unit length).

Two tokenizers: ``tokenizers`` (a Hugging Face ``tokenizer.json``: BERT-style WordPiece
files, such as all-MiniLM-L6-v2's, run by :mod:`.wordpiece` in pure Python with the same
ids; any other by the ``tokenizers`` package, imported on first use), and ``hashing``
(words hashed to buckets, standard library only) for the small test model.
"""

from __future__ import annotations

import json
import re
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from edgeos.errors import ConfigError, InvalidRequestError

if TYPE_CHECKING:
    from edgeos.runtime import ModelHost

#: Metadata keys of an embedding model file (written by :mod:`edgeos.memory.export`).
TOKENIZER_KEY = "edgeos.tokenizer"
EMBEDDING_KEY = "edgeos.embedding"
#: The model's input and output names.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
OUTPUT = "embedding"

Vectors = NDArray[np.float32]
#: Runs a model: (name, inputs) -> outputs by name. ``ctx`` passes its own, which counts
#: the call against the agent's rate limit and journals it.
InferFn = Callable[[str, Mapping[str, Any]], Mapping[str, Any]]

#: Texts embedded per model call: large batches pad every text to the longest one.
BATCH = 32


class Tokenizer(Protocol):
    """Turns texts into padded token ids and an attention mask."""

    def encode(self, texts: Sequence[str]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(input_ids, attention_mask), both batch x tokens."""
        ...


_WORD = re.compile(r"\w+")


class HashingTokenizer:
    """Lower-cased words hashed (crc32) to ``1..buckets-1``; 0 is padding."""

    def __init__(self, buckets: int, max_tokens: int) -> None:
        self.buckets = buckets
        self.max_tokens = max_tokens

    def encode(self, texts: Sequence[str]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Token ids and mask of each text, padded to the longest."""
        rows = [
            [zlib.crc32(w.encode()) % (self.buckets - 1) + 1 for w in _WORD.findall(t.lower())][
                : self.max_tokens
            ]
            or [0]  # a text without words embeds as nothing, but is still a row
            for t in texts
        ]
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = [1 if token else 0 for token in row]
        return ids, mask


class HuggingFaceTokenizer:
    """A ``tokenizer.json`` run by the ``tokenizers`` package, truncated to ``max_tokens``."""

    def __init__(self, config: str, max_tokens: int, model: str) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise ConfigError(
                f"embedding model '{model}' needs the tokenizers package: "
                "pip install 'edgeos[memory]'"
            ) from None
        tokenizer = _Tokenizer.from_str(config)
        tokenizer.enable_truncation(max_length=max_tokens)
        # Pad each batch to its longest text, not to the fixed width the file may ask for.
        pad = tokenizer.token_to_id("[PAD]") or 0
        tokenizer.enable_padding(pad_id=pad, pad_token="[PAD]")
        self._tokenizer = tokenizer

    def encode(self, texts: Sequence[str]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Token ids and mask of each text, padded to the longest."""
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], np.int64)
        mask = np.array([e.attention_mask for e in encodings], np.int64)
        return ids, mask


@dataclass(frozen=True)
class EmbeddingModel:
    """What the embedder knows of one model version: its tokenizer and dimension."""

    name: str
    version: str
    dim: int
    tokenizer: Tokenizer

    @property
    def key(self) -> str:
        """``name@version``: what records embedded by this model carry (see ``.reembed``)."""
        return f"{self.name}@{self.version}"


_models: dict[tuple[str, str, str], EmbeddingModel] = {}
_models_lock = threading.Lock()


def huggingface_tokenizer(config: str, max_tokens: int, model: str) -> Tokenizer:
    """The tokenizer of a ``tokenizer.json``: :mod:`.wordpiece` when it can run the file
    (without the ``tokenizers`` package and the ~14 MB resident it holds), else
    :class:`HuggingFaceTokenizer`."""
    from edgeos.memory.wordpiece import from_config

    return from_config(json.loads(config), max_tokens) or HuggingFaceTokenizer(
        config, max_tokens, model
    )


def describe(host: ModelHost, name: str) -> EmbeddingModel:
    """The tokenizer and dimension of the default version of a registered model.

    Read from the model file's metadata once per version; ConfigError when the model is
    not an embedding model edgeos can feed.
    """
    manifest = host.resolve(name)
    key = (manifest.name, manifest.version, manifest.sha256)
    with _models_lock:
        known = _models.get(key)
    if known is not None:
        return known
    loaded = host.load(name)
    metadata = loaded.session.get_modelmeta().custom_metadata_map
    where = f"model '{manifest.name}' version '{manifest.version}'"
    if TOKENIZER_KEY not in metadata or EMBEDDING_KEY not in metadata:
        raise ConfigError(
            f"{where} is not an edgeos embedding model (its metadata has no tokenizer); "
            "build one with python -m edgeos.memory.export"
        )
    spec = json.loads(metadata[TOKENIZER_KEY])
    dim = int(json.loads(metadata[EMBEDDING_KEY])["dim"])
    tokenizer: Tokenizer
    if spec["kind"] == "hashing":
        tokenizer = HashingTokenizer(int(spec["buckets"]), int(spec["max_tokens"]))
    elif spec["kind"] == "tokenizers":
        tokenizer = huggingface_tokenizer(spec["config"], int(spec["max_tokens"]), manifest.name)
    else:
        raise ConfigError(f"{where} names an unknown tokenizer kind {spec['kind']!r}")
    inputs = {t.name for t in manifest.inputs}
    outputs = {t.name for t in manifest.outputs}
    if inputs != {INPUT_IDS, ATTENTION_MASK} or OUTPUT not in outputs:
        raise ConfigError(
            f"{where} must take {INPUT_IDS} and {ATTENTION_MASK} and give {OUTPUT} "
            f"(it takes {sorted(inputs)} and gives {sorted(outputs)})"
        )
    model = EmbeddingModel(manifest.name, manifest.version, dim, tokenizer)
    with _models_lock:
        _models[key] = model
    return model


def embed(model: EmbeddingModel, texts: Sequence[str], infer: InferFn) -> Vectors:
    """Unit vectors of ``texts`` (one row each), in batches of :data:`BATCH`."""
    out = np.empty((len(texts), model.dim), np.float32)
    for start in range(0, len(texts), BATCH):
        ids, mask = model.tokenizer.encode(texts[start : start + BATCH])
        outputs = infer(model.name, {INPUT_IDS: ids, ATTENTION_MASK: mask})
        vectors = np.asarray(outputs[OUTPUT], np.float32)
        if vectors.shape != (len(ids), model.dim):
            raise InvalidRequestError(
                f"embedding model '{model.name}' gave shape {list(vectors.shape)} for "
                f"{len(ids)} texts; its metadata says {model.dim} dimensions"
            )
        out[start : start + len(ids)] = vectors
    return out


def host_infer(host: ModelHost) -> InferFn:
    """Model calls straight through the host (the CLI and tools; steps use their ctx's)."""

    def infer(name: str, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        return host.infer(name, inputs).outputs

    return infer
