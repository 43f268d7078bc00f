"""The model registry: round trips, versions, defaults, and refusals that change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgeos.errors import ConflictError, InvalidModelError, ManifestError, ModelNotFoundError
from edgeos.runtime import ModelRegistry
from tests import onnx_models


def snapshot(registry: ModelRegistry) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """Everything a refused change must leave untouched: rows and stored files."""
    rows = [(m.name, m.version, d) for m, d in registry.catalog()]
    files = sorted(str(p.relative_to(registry.store)) for p in registry.store.rglob("*"))
    return rows, files


def test_add_reads_signature_and_stores_by_content(registry: ModelRegistry, mlp_file: Path) -> None:
    record = registry.add(mlp_file, name="risk")
    assert (record.name, record.version, record.opset) == ("risk", "1", 17)
    assert [(t.name, t.datatype, t.shape) for t in record.inputs] == [("features", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, t.shape) for t in record.outputs] == [
        ("probabilities", "FP32", [-1, 2]),
        ("label", "INT64", [-1]),
    ]
    stored = registry.path(record)
    assert stored.read_bytes() == mlp_file.read_bytes()
    assert stored.name == f"{record.sha256}.onnx"
    assert registry.get("risk") == record


def test_versions_coexist_share_bytes_and_one_is_default(
    registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    other = onnx_models.mlp(tmp_path / "other.onnx", seed=5)
    v1 = registry.add(mlp_file, name="risk")
    v2 = registry.add(other, name="risk")
    v3 = registry.add(mlp_file, name="risk", version="canary")
    assert [v.version for v in (v1, v2, v3)] == ["1", "2", "canary"]
    assert registry.default_version("risk") == "1"
    assert registry.path(v1) == registry.path(v3)
    assert len(list((registry.store / "sha256").iterdir())) == 2
    registry.set_default("risk", "2")
    assert registry.get("risk").version == "2"
    defaults = [m.version for m, d in registry.catalog() if d]
    assert defaults == ["2"]


def test_add_with_make_default_moves_the_default(registry: ModelRegistry, mlp_file: Path) -> None:
    registry.add(mlp_file, name="risk")
    registry.add(mlp_file, name="risk", make_default=True)
    assert registry.default_version("risk") == "2"


def test_remove_version_promotes_newest_and_deletes_unshared_bytes(
    registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    other = onnx_models.mlp(tmp_path / "other.onnx", seed=5)
    v1 = registry.add(mlp_file, name="risk")
    v2 = registry.add(other, name="risk")
    registry.remove("risk", "1")
    assert registry.default_version("risk") == "2"
    assert not registry.path(v1).exists()
    assert registry.path(v2).exists()
    registry.remove("risk")
    assert registry.catalog() == []
    assert not registry.path(v2).exists()
    with pytest.raises(ModelNotFoundError, match="no model named 'risk'"):
        registry.get("risk")


def test_manifest_fields_are_kept(registry: ModelRegistry, mlp_file: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "task": "classification",
                "labels": ["ok", "stockout"],
                "cost_per_call": 0.002,
                "privacy": "local-only",
                "batching": {"max_batch_size": 16, "max_queue_delay_ms": 1},
                "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
            }
        )
    )
    record = registry.add(mlp_file, name="risk", manifest=manifest)
    assert record.labels == ["ok", "stockout"]
    assert record.privacy == "local-only"
    assert record.batching is not None
    assert record.batching.max_batch_size == 16
    assert registry.get("risk").cost_per_call == 0.002


def test_unknown_model_and_version(registry: ModelRegistry, mlp_file: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no model named 'ghost'"):
        registry.get("ghost")
    registry.add(mlp_file, name="risk")
    with pytest.raises(ModelNotFoundError, match="model 'risk' has no version '9'"):
        registry.get("risk", "9")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: p.write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10),
            "not an ONNX model",
        ),
        (lambda p: p.write_text("name: not a model\n"), "not an ONNX model"),
        (lambda p: p.write_bytes(b""), "not an ONNX model"),
        (onnx_models.checker_failure, "fails the ONNX checker"),
        (onnx_models.unknown_op, "cannot be loaded by ONNX Runtime"),
    ],
)
def test_bad_model_files_are_refused_and_change_nothing(
    registry: ModelRegistry, mlp_file: Path, tmp_path: Path, make: object, message: str
) -> None:
    registry.add(mlp_file, name="risk")
    before = snapshot(registry)
    bad = tmp_path / "bad.onnx"
    make(bad)  # type: ignore[operator]
    with pytest.raises(InvalidModelError, match=message) as info:
        registry.add(bad, name="risk")
    assert str(bad) in str(info.value)
    assert snapshot(registry) == before


def test_missing_file_is_refused(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="cannot read model file"):
        registry.add(tmp_path / "absent.onnx", name="x")
    assert snapshot(registry) == ([], [])


@pytest.mark.parametrize(
    ("manifest", "field", "reason"),
    [
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"privacy": "secret"}, "privacy", "local-only"),
        ({"cost_per_call": -1}, "cost_per_call", "greater than or equal to 0"),
        ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size", "greater than"),
        (
            {"inputs": [{"name": "features", "datatype": "FP64", "shape": [-1, 4]}]},
            "inputs.0",
            "datatype FP64 but the model says FP32",
        ),
        (
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 4]}]},
            "inputs.0",
            "no input named 'pixels'",
        ),
        (
            {"outputs": [{"name": "label", "datatype": "INT64", "shape": [-1, 3]}]},
            "outputs.0",
            "shape",
        ),
        ({"name": "other"}, "name", "command line says 'risk'"),
    ],
)
def test_bad_manifest_names_file_and_field_and_changes_nothing(
    registry: ModelRegistry,
    mlp_file: Path,
    tmp_path: Path,
    manifest: dict[str, object],
    field: str,
    reason: str,
) -> None:
    registry.add(mlp_file, name="risk")
    before = snapshot(registry)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ManifestError) as info:
        registry.add(mlp_file, name="risk", manifest=path)
    text = str(info.value)
    assert str(path) in text
    assert f"'{field}'" in text
    assert reason in text
    assert snapshot(registry) == before


def test_manifest_that_is_not_yaml(registry: ModelRegistry, mlp_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("task: [classification\n")
    with pytest.raises(ManifestError, match=r"line \d+, column \d+: not valid YAML"):
        registry.add(mlp_file, manifest=path)


def test_duplicate_version_and_bad_names(registry: ModelRegistry, mlp_file: Path) -> None:
    registry.add(mlp_file, name="risk", version="7")
    before = snapshot(registry)
    with pytest.raises(ConflictError, match="already has a version '7'"):
        registry.add(mlp_file, name="risk", version="7")
    with pytest.raises(ManifestError, match="model name"):
        registry.add(mlp_file, name="Bad Name!")
    with pytest.raises(ManifestError, match="model version"):
        registry.add(mlp_file, name="risk", version="../escape")
    assert snapshot(registry) == before


def test_profiles_are_stored_and_removed_with_the_version(
    registry: ModelRegistry, mlp_file: Path
) -> None:
    registry.add(mlp_file, name="risk")
    assert registry.profile("risk", "1") is None
    registry.save_profile("risk", "1", {"p50_ms": 0.01})
    registry.save_profile("risk", "1", {"p50_ms": 0.02})
    assert registry.profile("risk", "1") == {"p50_ms": 0.02}
    registry.remove("risk", "1")
    registry.add(mlp_file, name="risk", version="1")
    assert registry.profile("risk", "1") is None
