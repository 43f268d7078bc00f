"""Embeddings on the device: our all-MiniLM-L6-v2 export matches the PyTorch reference, and
the demo agent's memory of its store (supplier notes, customer preferences) is recalled by
paraphrased queries. Also what the embedder refuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeos.demo.knowledge import NOTES, PARAPHRASES
from edgeos.errors import ConfigError
from edgeos.manifests.agent import Memory
from edgeos.memory.embeddings import describe, embed, host_infer
from edgeos.memory.handle import AgentMemory
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.state import Database
from tests import onnx_models
from tests.memory_support import minilm_int8_model, minilm_model, register

# sentence-transformers' all-MiniLM-L6-v2 in PyTorch (transformers BertModel, mean pooling,
# L2 normalisation) on these sentences: the first six dimensions and the cosine matrix.
SENTENCES = [
    "The supplier Acme delivers on Tuesdays.",
    "Alice prefers oat milk and no sugar.",
    "hello world",
    "A much longer sentence about the cold chain: the refrigerated truck from Northwind "
    "arrives late every Friday, so dairy runs short before the weekend.",
]
REFERENCE_HEAD = np.array([
    [-0.115398, -0.035504, 0.007722, 0.060787, -0.035386, 0.026429],
    [0.035244, 0.042723, -0.06228, 0.076232, -0.02666, -0.035644],
    [-0.034477, 0.031023, 0.006735, 0.026109, -0.039362, -0.160302],
    [0.03264, -0.007093, 0.100793, 0.081517, 0.088153, 0.016463],
])  # fmt: skip
REFERENCE_COSINE = np.array([
    [1.0, 0.065902, 0.069442, 0.239973],
    [0.065902, 1.0, 0.084421, 0.282508],
    [0.069442, 0.084421, 1.0, 0.142048],
    [0.239973, 0.282508, 0.142048, 1.0],
])  # fmt: skip


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("minilm")
    return minilm_model(directory).parent


@pytest.fixture
def minilm(registry: ModelRegistry, minilm_dir: Path) -> Iterator[ModelHost]:
    host = register(registry, minilm_dir / "all-minilm-l6-v2.onnx")
    yield host
    host.close()


def test_our_export_matches_the_pytorch_reference(minilm: ModelHost) -> None:
    model = describe(minilm, "all-minilm-l6-v2")
    assert model.dim == 384
    vectors = embed(model, SENTENCES, host_infer(minilm))
    np.testing.assert_allclose(vectors[:, :6], REFERENCE_HEAD, atol=2e-5)
    np.testing.assert_allclose(vectors @ vectors.T, REFERENCE_COSINE, atol=2e-5)
    # Batched (padded) and one by one give the same vectors: padding gets no attention.
    alone = np.vstack([embed(model, [s], host_infer(minilm)) for s in SENTENCES])
    np.testing.assert_allclose(alone, vectors, atol=1e-5)


@pytest.fixture
def minilm_int8(registry: ModelRegistry, minilm_dir: Path) -> Iterator[ModelHost]:
    host = register(registry, minilm_int8_model(minilm_dir))
    yield host
    host.close()


# The int8 variant is the demo's: it must recall as well as the fp32 model.
@pytest.mark.parametrize("variant", ["minilm", "minilm_int8"])
def test_paraphrased_queries_find_the_right_note_in_the_top_3(
    db: Database, variant: str, request: pytest.FixtureRequest
) -> None:
    # The demo agent's own memory: the supplier notes and customer preferences the demo
    # gives it, asked for in other words.
    memory = AgentMemory(db, request.getfixturevalue(variant), "inventory", Memory())
    ids = {
        memory.remember(note.text, note.metadata, subject=note.subject): note.key for note in NOTES
    }
    memory.commit()
    ranks = {}
    for query, expected in PARAPHRASES.items():
        found = [ids[r.id] for r in memory.recall(query, k=3)]
        ranks[query] = found.index(expected) + 1 if expected in found else None
    missed = {q: r for q, r in ranks.items() if r is None}
    assert not missed, f"not in the top 3: {missed}"
    top1 = sum(r == 1 for r in ranks.values())
    print(f"{top1}/{len(PARAPHRASES)} paraphrased queries found their note first, all in the top 3")


def test_a_model_without_a_tokenizer_is_not_an_embedding_model(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    registry.add(onnx_models.mlp(tmp_path / "mlp.onnx"), name="mlp")
    host = ModelHost(registry)
    try:
        with pytest.raises(ConfigError, match="not an edgeos embedding model"):
            describe(host, "mlp")
    finally:
        host.close()
