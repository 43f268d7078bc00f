"""Quantization and profiling on the real demo model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeos.demo.train import DemoModels
from edgeos.errors import ConflictError, InvalidRequestError
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.runtime.profile import profile_model
from edgeos.runtime.quantize import load_eval_set, quantize_model


@pytest.fixture
def demo_registry(registry: ModelRegistry, demo_models: DemoModels) -> ModelRegistry:
    name = "stockout-risk-xl"
    registry.add(
        demo_models.models[name], name=name, version="1", manifest=demo_models.manifests[name]
    )
    return registry


def test_static_quantization_writes_qdq_s8s8_and_reports(
    demo_registry: ModelRegistry, demo_models: DemoModels
) -> None:
    source = demo_registry.get("stockout-risk-xl")
    eval_set = load_eval_set(demo_models.eval_set, source)
    report = quantize_model(demo_registry, "stockout-risk-xl", eval_set=eval_set, iterations=100)
    int8 = demo_registry.get("stockout-risk-xl", "1-int8")
    assert int8.quantization == "int8-static-qdq-s8s8"
    assert int8.derived_from == "1"
    assert (int8.task, int8.labels, int8.cost_per_call) == (
        source.task,
        source.labels,
        source.cost_per_call,
    )
    graph = onnx.load(str(demo_registry.path(int8))).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert weights, "weights should be stored as signed 8-bit"
    assert report.int8_bytes == int8.size_bytes
    assert report.size_ratio < 0.5  # weights dominate the xl model, so INT8 is far smaller
    assert report.fp32_accuracy is not None
    assert report.int8_accuracy is not None
    assert abs(report.accuracy_delta or 0) < 5
    assert report.fp32_accuracy == pytest.approx(
        demo_models.metrics["stockout-risk-xl"].accuracy, abs=1e-6
    )
    assert report.fp32_latency.p50_ms <= report.fp32_latency.p99_ms
    # The verdict and the registry agree, whichever way this machine decides.
    assert (demo_registry.default_version("stockout-risk-xl") == "1-int8") == report.made_default
    assert report.made_default == (not report.reasons)


def test_accuracy_gate_refuses_default_and_says_why(
    demo_registry: ModelRegistry, demo_models: DemoModels
) -> None:
    eval_set = load_eval_set(demo_models.eval_set, demo_registry.get("stockout-risk-xl"))
    # A negative allowance means "INT8 must be better than FP32 by 100 points": impossible.
    report = quantize_model(
        demo_registry, "stockout-risk-xl", eval_set=eval_set, max_accuracy_drop=-100, iterations=50
    )
    assert not report.made_default
    assert any("accuracy drops" in reason for reason in report.reasons)
    assert demo_registry.default_version("stockout-risk-xl") == "1"


def test_without_eval_set_int8_is_never_default(demo_registry: ModelRegistry) -> None:
    report = quantize_model(demo_registry, "stockout-risk-xl", mode="dynamic", iterations=50)
    assert report.version == "1-int8-dyn"
    assert report.fp32_accuracy is None
    assert "no evaluation set" in report.reasons[0]
    assert demo_registry.default_version("stockout-risk-xl") == "1"
    with pytest.raises(ConflictError, match="already has version '1-int8-dyn'"):
        quantize_model(demo_registry, "stockout-risk-xl", mode="dynamic", iterations=10)


def test_int8_outputs_agree_with_fp32(
    demo_registry: ModelRegistry, demo_models: DemoModels
) -> None:
    eval_set = load_eval_set(demo_models.eval_set, demo_registry.get("stockout-risk-xl"))
    quantize_model(demo_registry, "stockout-risk-xl", eval_set=eval_set, iterations=20)
    host = ModelHost(demo_registry, HostConfig())
    try:
        x = eval_set.inputs["features"][:200]
        fp32 = host.infer("stockout-risk-xl", {"features": x}, version="1").outputs["probabilities"]
        int8 = host.infer("stockout-risk-xl", {"features": x}, version="1-int8").outputs[
            "probabilities"
        ]
    finally:
        host.close()
    assert np.mean(np.argmax(fp32, 1) == np.argmax(int8, 1)) > 0.95
    assert np.max(np.abs(fp32 - int8)) < 0.2


def test_eval_set_must_match_the_model(demo_registry: ModelRegistry, tmp_path: Path) -> None:
    path = tmp_path / "wrong.npz"
    np.savez(path, pixels=np.zeros((3, 2), np.float32))
    with pytest.raises(InvalidRequestError, match="no array for model input"):
        load_eval_set(path, demo_registry.get("stockout-risk-xl"))
    bad = tmp_path / "bad.npz"
    bad.write_text("nope")
    with pytest.raises(InvalidRequestError, match=r"not a readable \.npz"):
        load_eval_set(bad, demo_registry.get("stockout-risk-xl"))


def test_profile_reports_batches_throughput_and_memory(demo_registry: ModelRegistry) -> None:
    host = ModelHost(demo_registry, HostConfig())
    try:
        profile = profile_model(host, "stockout-risk-xl", batch_sizes=(1, 16), iterations=50)
    finally:
        host.close()
    assert [b.batch_size for b in profile.batches] == [1, 16]
    for batch in profile.batches:
        lat = batch.latency
        assert 0 < lat.p50_ms <= lat.p95_ms <= lat.p99_ms <= lat.max_ms
        assert batch.rows_per_second == pytest.approx(batch.batch_size * 1000 / lat.mean_ms)
    # Larger batches amortise per-call overhead.
    assert profile.batches[1].rows_per_second > profile.batches[0].rows_per_second
    assert profile.providers == ["CPUExecutionProvider"]
    assert profile.peak_memory_bytes > profile.added_memory_bytes >= 0
    demo_registry.save_profile(profile.name, profile.version, profile.to_dict())
    stored = demo_registry.profile("stockout-risk-xl", "1")
    assert stored is not None
    assert stored["batches"][0]["latency"]["p99_ms"] == profile.batches[0].latency.p99_ms
