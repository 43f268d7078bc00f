"""Shared fixtures: node data directories, registries, small models, the demo models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeos.demo.train import DemoModels, build_demo_models
from edgeos.runtime import ModelRegistry
from edgeos.state import Database
from tests import onnx_models

# The suite runs in parallel workers with no terminal: Rich would wrap the CLI's tables and
# lines at 80 columns there, and at the terminal's width in a plain run. One width for both.
os.environ["COLUMNS"] = "250"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database(tmp_path / "node" / "node.db") as database:
        yield database


@pytest.fixture
def registry(db: Database, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(db, tmp_path / "node" / "models")


@pytest.fixture
def mlp_file(tmp_path: Path) -> Path:
    return onnx_models.mlp(tmp_path / "mlp.onnx")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> DemoModels:
    """The real demo models, trained on a smaller data set to keep the suite quick."""
    return build_demo_models(tmp_path_factory.mktemp("demo-models"), rows=8_000)


# The fleet's fixtures (databases on SQLite and PostgreSQL, a running TLS fleet) and the
# memory tests' (a host with the hashing embedding model).
pytest_plugins = ["tests.fleet_support", "tests.memory_support"]
