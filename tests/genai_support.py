"""What the generative-model tests share: a small language model trained by our own code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def require_genai() -> None:
    """Skip, saying what to install, unless PyTorch and ONNX Runtime GenAI are there."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        pytest.skip("onnxruntime-genai is not installed: pip install 'edgeos[genai]'")
    if importlib.util.find_spec("torch") is None:
        pytest.skip(
            "PyTorch trains the test model and is not installed: pip install 'edgeos[genai-build]'"
        )


def tiny_model(directory: Path) -> Path:
    """A language model of the demo's kind, in its smallest size (seconds to train), built
    once in ``directory`` (the session's base temporary directory, for every module)."""
    require_genai()
    from edgeos.genai.train import TINY, build

    out = directory / "drafter"
    if not (out / "genai_config.json").exists():
        build(out, TINY, seed=0)
    return out


def slow_model(directory: Path) -> Path:
    """An untrained model wide enough that each token takes milliseconds: a generation
    still running when a test acts on it."""
    require_genai()
    from edgeos.genai.train import Size, build

    out = directory / "slow-drafter"
    if not (out / "genai_config.json").exists():
        size = Size(
            vocab=300, dim=384, layers=6, heads=6, context=256, examples=200, steps=0, batch=1,
            learning_rate=0.0,
        )  # fmt: skip
        build(out, size, seed=0)
    return out
