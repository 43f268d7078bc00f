"""The demo language model as Hugging Face ``transformers`` GPT-2, for comparisons.

The trainer's decoder (:mod:`edgeos.genai.train`) is GPT-2's block exactly: pre-norm
LayerNorms with eps 1e-5, a fused QKV projection, a 4x MLP with exact GELU (GPT-2's
``activation_function="gelu"``; its default is the tanh approximation), biases everywhere,
learned positions and an output layer tied to the embedding. :func:`gpt2_from_export`
loads an export's weights into ``transformers.GPT2LMHeadModel`` unchanged, so the
benchmark runs both libraries on the same weights, and a test holds their logits equal.
Needs PyTorch and ``transformers`` (the ``genai-build`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Each block's weights in the order its forward uses them, as GPT-2 names them: the
# export's layer norms, then its linear layers (weight and bias).
_GPT2_NORMS = ("ln_1", "ln_2")
_GPT2_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2_from_export(model_dir: Path) -> Any:
    """The exported decoder in ``model_dir`` as ``transformers.GPT2LMHeadModel`` (in eval
    mode), its weights read from ``model.onnx``: the same function of the same weights.

    The export names its weights unreliably (a linear layer's weight is a MatMul operand
    under a generated name, in GPT-2's ``Conv1D`` input-by-output layout, and equal layer
    norms share one tensor), so they are taken by their place in the graph: its layer
    norms and linear layers come in the order of the forward pass.
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import GPT2Config, GPT2LMHeadModel

    config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))["model"]
    decoder = config["decoder"]
    layers = decoder["num_hidden_layers"]
    graph = onnx.load(str(model_dir / decoder["filename"])).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # equal tensors the export stored once
        if node.op_type == "Identity" and node.input[0] in tensors:
            tensors[node.output[0]] = tensors[node.input[0]]
    adds = {i: n for n in graph.node if n.op_type == "Add" for i in n.input}
    norms: list[tuple[str, str]] = []
    linears: list[tuple[str, str]] = []
    for node in graph.node:
        if node.op_type == "LayerNormalization":
            norms.append((node.input[1], node.input[2]))
        elif node.op_type == "MatMul" and node.input[1] in tensors:
            add = adds.get(node.output[0])
            added = [i for i in add.input if i in tensors] if add is not None else []
            if added:  # the bias-free one is the output layer, tied to the embedding
                linears.append((node.input[1], added[0]))
    if len(norms) != 2 * layers + 1 or len(linears) != 4 * layers:
        raise ValueError(f"{model_dir}: not a decoder of this trainer's architecture")
    names = {"transformer.wte.weight": "embed.weight", "transformer.wpe.weight": "position.weight"}
    for index in range(layers):
        for gpt2, (weight, bias) in zip(
            (*_GPT2_NORMS, *_GPT2_LINEARS),
            (*norms[2 * index : 2 * index + 2], *linears[4 * index : 4 * index + 4]),
            strict=True,
        ):
            names[f"transformer.h.{index}.{gpt2}.weight"] = weight
            names[f"transformer.h.{index}.{gpt2}.bias"] = bias
    names["transformer.ln_f.weight"], names["transformer.ln_f.bias"] = norms[-1]
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=config["vocab_size"], n_positions=config["context_length"],
            n_embd=decoder["hidden_size"], n_layer=layers,
            n_head=decoder["num_attention_heads"], activation_function="gelu",
            layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"],
            pad_token_id=config["pad_token_id"], tie_word_embeddings=True,
        )
    )  # fmt: skip
    state = {ours: torch.from_numpy(np.array(tensors[theirs])) for ours, theirs in names.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"lm_head.weight"}:  # lm_head is wte, tied
        raise ValueError(f"{model_dir}: weights missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.train(False)  # inference: dropout is off anyway (all rates 0)
    return model
