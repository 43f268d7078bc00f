"""The demo language model's export is GPT-2 exactly: Hugging Face ``transformers`` loads
its weights and computes the same logits and the same greedy answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.genai_support import tiny_model

pytest.importorskip("transformers", reason="pip install 'edgeos[genai-build]'")


@pytest.fixture(scope="session")
def drafter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.getbasetemp())


def onnx_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """The export's logits for ``ids`` read at once, from an empty KV cache."""
    import onnxruntime as ort

    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(ids.shape[1])[None],
        **{i.name: empty for i in session.get_inputs() if i.name.startswith("past_")},
    }
    logits: np.ndarray = session.run(["logits"], feed)[0]
    return logits


def test_transformers_gpt2_computes_the_exports_logits(drafter: Path) -> None:
    import torch

    from edgeos.genai.gpt2 import gpt2_from_export

    model = gpt2_from_export(drafter)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 100))
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    ours = onnx_logits(drafter, ids)
    assert ours.shape == theirs.shape == (1, 100, model.config.vocab_size)
    assert np.abs(ours).max() > 1  # trained: far from the uniform logits of small weights
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_transformers_generate_writes_the_greedy_answers_of_onnx_runtime_genai(
    drafter: Path,
) -> None:
    import onnxruntime_genai as og
    import torch

    from edgeos.genai.corpus import examples
    from edgeos.genai.gpt2 import gpt2_from_export
    from edgeos.genai.train import format_prompt

    model = gpt2_from_export(drafter)
    genai = og.Model(str(drafter))
    tokenizer = og.Tokenizer(genai)
    lengths = []
    for ask, _ in examples(5, seed=3):
        ids = tokenizer.encode(format_prompt(ask)).tolist()
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=len(ids) + 20, do_sample=False)
        generator = og.Generator(genai, params)
        generator.append_tokens(ids)
        ours: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            ours.append(int(generator.get_next_tokens()[0]))
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=20, do_sample=False, use_cache=True,
            )  # fmt: skip
        assert out[0, len(ids) :].tolist() == ours  # step by step, through the KV cache
        lengths.append(len(ours))
    assert max(lengths) > 1
