"""The 8-bit all-MiniLM-L6-v2 the demo runs: our export's int8 variant is a quarter of the
fp32 file, is the same model to the node (name, tokenizer, dimension), and embeds text
close to the fp32 model. Its recall of the demo's notes is checked with the fp32 model's
in ``tests/test_memory_embeddings.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeos.demo.knowledge import NOTES, PARAPHRASES
from edgeos.memory.embeddings import describe, embed, host_infer
from edgeos.memory.export import MINILM_NAME
from edgeos.runtime import ModelRegistry
from edgeos.state import Database
from tests.memory_support import minilm_int8_model, minilm_model, register


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("minilm")
    return minilm_model(directory), minilm_int8_model(directory)


def test_the_int8_model_is_a_quarter_of_the_size(files: tuple[Path, Path]) -> None:
    fp32, int8 = files
    assert int8.stat().st_size < 0.3 * fp32.stat().st_size
    assert f"name: {MINILM_NAME}\n" in int8.with_suffix(".yaml").read_text()


def test_the_int8_model_embeds_close_to_fp32(files: tuple[Path, Path], tmp_path: Path) -> None:
    texts = [note.text for note in NOTES] + list(PARAPHRASES)
    vectors = []
    for n, file in enumerate(files):
        # One registry each: both register under the same model name.
        with Database(tmp_path / f"node{n}.db") as db:
            host = register(ModelRegistry(db, tmp_path / f"models{n}"), file)
            try:
                model = describe(host, MINILM_NAME)
                assert model.dim == 384
                vectors.append(embed(model, texts, host_infer(host)))
            finally:
                host.close()
    fp32, int8 = vectors
    cosines = (fp32 * int8).sum(axis=1)
    # Measured: 0.99 at worst on these texts (0.95 when quantized per tensor).
    assert cosines.min() > 0.98, f"worst cosine to fp32: {cosines.min():.4f}"
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)


def test_int8_is_refused_for_the_hashing_model(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgeos.memory.export", "--out", str(tmp_path), "--hashing",
         "--int8"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--int8 quantizes all-MiniLM-L6-v2" in result.stderr
    assert not list(tmp_path.iterdir())
