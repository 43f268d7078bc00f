"""The demo retail data and the stockout-risk models built from it, on real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from edgeos.demo.retail import FEATURE_NAMES, RetailDataset, SalesSimulator, generate
from edgeos.demo.train import (
    INPUT_NAME,
    LABELS,
    MLP,
    OUTPUT_NAME,
    SMALL,
    SPECS,
    XL,
    DemoModels,
    ModelSpec,
    build_demo_models,
    main,
    roc_auc,
)

COLUMN = {name: i for i, name in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> DemoModels:
    """Both models built once, on enough rows for the XL model's edge to show."""
    return build_demo_models(tmp_path_factory.mktemp("demo"), rows=20_000, seed=7)


@pytest.fixture(scope="module")
def dataset() -> RetailDataset:
    return generate(5_000, seed=3)


def _eval_set(built: DemoModels) -> tuple[np.ndarray, np.ndarray]:
    with np.load(built.eval_set) as data:
        return data["features"], data["labels"]


def test_generate_is_deterministic_for_a_seed_and_varies_with_it(dataset: RetailDataset) -> None:
    again = generate(5_000, seed=3)
    np.testing.assert_array_equal(dataset.features, again.features)
    np.testing.assert_array_equal(dataset.labels, again.labels)
    other = generate(5_000, seed=4)
    assert not np.array_equal(dataset.features, other.features)
    assert dataset.features.dtype == np.float32
    assert dataset.labels.dtype == np.int64
    assert dataset.features.shape == (5_000, len(FEATURE_NAMES))
    assert np.isfinite(dataset.features).all()


def test_label_rate_is_in_a_sane_range(dataset: RetailDataset) -> None:
    assert 0.15 <= dataset.positive_rate <= 0.35


def test_labels_follow_the_simulated_future(dataset: RetailDataset) -> None:
    x, y = dataset.features, dataset.labels
    cover, lead = x[:, COLUMN["days_of_cover"]], x[:, COLUMN["lead_time_days"]]
    stock, due = x[:, COLUMN["stock_on_hand"]], x[:, COLUMN["days_to_next_delivery"]]
    well_stocked = (cover >= 2 * lead) & (lead <= 7)
    empty_and_waiting = (stock == 0) & (due >= 2)
    assert well_stocked.sum() > 100
    assert empty_and_waiting.sum() > 100
    assert y[well_stocked].mean() < 0.05
    assert y[empty_and_waiting].mean() > 0.9
    # Not a formula of the features: in between, both outcomes occur.
    tight = (cover > 0.8 * lead) & (cover < 1.2 * lead)
    assert 0.1 < y[tight].mean() < 0.9


def test_split_partitions_rows_reproducibly(dataset: RetailDataset) -> None:
    first, second = dataset.split(0.2, seed=1)
    assert (len(first), len(second)) == (1_000, 4_000)
    again, _ = dataset.split(0.2, seed=1)
    np.testing.assert_array_equal(first.features, again.features)
    together = np.concatenate([first.features, second.features])
    assert sorted(map(bytes, together)) == sorted(map(bytes, dataset.features))
    with pytest.raises(ValueError, match="empty"):
        dataset.split(0.0, seed=1)


def test_simulator_streams_consistent_observations() -> None:
    sim = SalesSimulator(n_stores=2, n_skus=3, seed=11)
    days = [sim.step() for _ in range(30)]
    assert sim.day == 29
    assert {len(day) for day in days} == {6}
    assert len({(o.store, o.sku) for o in days[0]}) == 6
    for observation in (o for day in days for o in day):
        assert observation.features.shape == (len(FEATURE_NAMES),)
        assert observation.features.dtype == np.float32
        assert observation.stock_on_hand >= 0
        assert observation.units_sold >= 0
        assert observation.features[COLUMN["stock_on_hand"]] == observation.stock_on_hand
    replay = SalesSimulator(n_stores=2, n_skus=3, seed=11)
    first = replay.step()
    assert [o.units_sold for o in first] == [o.units_sold for o in days[0]]
    np.testing.assert_array_equal(first[0].features, days[0][0].features)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_exported_model_is_valid_and_matches_numpy(built: DemoModels, spec: ModelSpec) -> None:
    name = spec.name
    model = onnx.load(str(built.models[name]))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (model_input,) = model.graph.input
    (model_output,) = model.graph.output
    assert model_input.name == INPUT_NAME
    assert model_output.name == OUTPUT_NAME
    for value, width in ((model_input, len(FEATURE_NAMES)), (model_output, len(LABELS))):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = value.type.tensor_type.shape.dim
        assert (dims[0].dim_param, dims[1].dim_value) == ("batch", width)

    features, _ = _eval_set(built)
    session = ort.InferenceSession(str(built.models[name]), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run([OUTPUT_NAME], {INPUT_NAME: features})
    assert probabilities.shape == (len(features), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # Raw features in, so the numpy pass standardises exactly as the graph must.
    expected = MLP.from_onnx(model).predict_proba(features)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-6)


def test_models_have_the_intended_sizes(built: DemoModels) -> None:
    small, xl = built.metrics[SMALL.name], built.metrics[XL.name]
    assert small.hidden == SMALL.hidden
    assert xl.hidden == XL.hidden
    assert small.parameters < 500 < 50_000 < xl.parameters
    assert built.models[SMALL.name].stat().st_size < 8_000


def test_xl_model_beats_small_model_on_held_out_data(built: DemoModels) -> None:
    features, labels = _eval_set(built)
    auc = {}
    for name, path in built.models.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (probabilities,) = session.run([OUTPUT_NAME], {INPUT_NAME: features})
        auc[name] = roc_auc(labels, probabilities[:, 1])
        accuracy = float((probabilities.argmax(axis=1) == labels).mean())
        # metrics.json reports what the shipped file does.
        assert built.metrics[name].auc == pytest.approx(auc[name], abs=1e-9)
        assert built.metrics[name].accuracy == pytest.approx(accuracy, abs=1e-9)
    assert auc[XL.name] > auc[SMALL.name]
    assert auc[SMALL.name] > 0.85


def test_eval_set_and_metrics_files(built: DemoModels) -> None:
    features, labels = _eval_set(built)
    assert features.dtype == np.float32
    assert labels.dtype == np.int64
    assert features.shape == (2_000, len(FEATURE_NAMES))
    assert set(np.unique(labels)) == {0, 1}
    recorded = json.loads(built.metrics_file.read_text())
    assert (recorded["rows"], recorded["seed"]) == (20_000, 7)
    assert set(recorded["models"]) == {s.name for s in SPECS}


def test_manifests_carry_serving_fields_only(built: DemoModels) -> None:
    for spec in SPECS:
        manifest = yaml.safe_load(built.manifests[spec.name].read_text())
        assert manifest["task"] == "classification"
        assert manifest["labels"] == ["in_stock", "stockout"]
        assert manifest["privacy"] == "internal"
        assert manifest["execution_providers"] == ["CPUExecutionProvider"]
        assert manifest["cost_per_call"] == spec.cost_per_call
        assert manifest["description"]
        assert not {"name", "version", "inputs", "outputs"} & set(manifest)
    # The small model runs on the device for free; the XL one is the paid cloud model.
    assert SMALL.cost_per_call == 0.0 < XL.cost_per_call


def test_build_is_idempotent_and_force_rebuilds(tmp_path: Path) -> None:
    first = build_demo_models(tmp_path, rows=2_000, seed=5)
    assert first.rebuilt
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == [
        "eval.npz",
        "metrics.json",
        "stockout-risk-xl.onnx",
        "stockout-risk-xl.yaml",
        "stockout-risk.onnx",
        "stockout-risk.yaml",
    ]
    contents = {p: p.read_bytes() for p in files}
    # Backdate every file, so any rewrite shows however coarse the file system's clock.
    for p in files:
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))

    messages: list[str] = []
    second = build_demo_models(tmp_path, rows=9_999, seed=6, progress=messages.append)
    assert not second.rebuilt
    assert (second.rows, second.seed) == (2_000, 5)  # what the files were built from
    assert second.metrics == first.metrics
    assert all(p.stat().st_mtime_ns == 1_000_000_000 for p in files)
    assert messages == [f"demo models in {tmp_path} are up to date"]

    forced = build_demo_models(tmp_path, rows=2_000, seed=5, force=True)
    assert forced.rebuilt
    assert all(p.stat().st_mtime_ns != 1_000_000_000 for p in files)
    # Same seed, same bytes: the build is deterministic end to end.
    assert {p: p.read_bytes() for p in files} == contents
    assert not list(tmp_path.glob(".*.tmp"))


def test_interrupted_build_is_redone(tmp_path: Path) -> None:
    build_demo_models(tmp_path, rows=1_000, seed=5)
    (tmp_path / "metrics.json").unlink()  # as if the build died before finishing
    assert build_demo_models(tmp_path, rows=1_000, seed=5).rebuilt


def test_command_line_prints_a_summary(
    built: DemoModels, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(built.out_dir)]) == 0
    out = capsys.readouterr().out
    assert "already up to date" in out
    for spec in SPECS:
        assert spec.name in out
