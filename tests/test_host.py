"""The model host: same answers as ONNX Runtime, checked inputs, budget, batching."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from edgeos.errors import InvalidRequestError, ModelNotFoundError, ResourceError
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.state import Database
from edgeos.telemetry import MetricsRegistry
from tests import onnx_models


@pytest.fixture
def host(registry: ModelRegistry) -> Iterator[ModelHost]:
    h = ModelHost(registry, HostConfig(inference_threads=2))
    yield h
    h.close()


def direct(path: Path, features: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, {"features": features}))


def test_infer_matches_a_direct_onnxruntime_run(
    host: ModelHost, registry: ModelRegistry, mlp_file: Path
) -> None:
    registry.add(mlp_file, name="risk")
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    result = host.infer("risk", {"features": x})
    probs, label = direct(mlp_file, x)
    assert (result.model, result.version) == ("risk", "1")
    np.testing.assert_array_equal(result.outputs["probabilities"], probs)
    np.testing.assert_array_equal(result.outputs["label"], label)
    only = host.infer("risk", {"features": x}, outputs=["label"])
    assert list(only.outputs) == ["label"]


def test_async_infer_matches_sync(host: ModelHost, registry: ModelRegistry, mlp_file: Path) -> None:
    registry.add(mlp_file, name="risk")
    x = np.ones((3, 4), np.float32)

    async def go() -> dict[str, np.ndarray]:
        return (await host.infer_async("risk", {"features": x})).outputs

    out = asyncio.run(go())
    np.testing.assert_array_equal(
        out["probabilities"], host.infer("risk", {"features": x}).outputs["probabilities"]
    )


def test_session_options_disable_spinning_and_report_providers(
    host: ModelHost, registry: ModelRegistry, mlp_file: Path
) -> None:
    registry.add(mlp_file, name="risk")
    loaded = host.load("risk")
    options = loaded.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 1
    assert loaded.providers == ["CPUExecutionProvider"]


def test_unavailable_execution_provider_falls_back_to_cpu(
    registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"execution_providers": ["CUDAExecutionProvider"]}))
    registry.add(mlp_file, name="risk", manifest=manifest)
    config = HostConfig(execution_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    host = ModelHost(registry, config)
    try:
        assert host.load("risk").providers == ["CPUExecutionProvider"]
    finally:
        host.close()


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        (
            {"features": np.ones((2, 5), np.float32)},
            None,
            r"shape \[2, 5\] but the model takes \[-1, 4\]",
        ),
        ({"features": np.ones((2, 4), np.float64)}, None, "datatype FP64 but the model takes FP32"),
        ({"features": np.ones(4, np.float32)}, None, r"shape \[4\]"),
        ({"pixels": np.ones((1, 4), np.float32)}, None, "no input named 'pixels'"),
        ({}, None, "input 'features' is missing"),
        ({"features": [["a", "b", "c", "d"]]}, None, "not a valid FP32 tensor"),
        ({"features": np.ones((1, 4), np.float32)}, ["logits"], "no output named 'logits'"),
    ],
)
def test_bad_inputs_are_refused_naming_what(
    host: ModelHost,
    registry: ModelRegistry,
    mlp_file: Path,
    inputs: dict[str, object],
    outputs: list[str] | None,
    message: str,
) -> None:
    registry.add(mlp_file, name="risk")
    with pytest.raises(InvalidRequestError, match=message):
        host.infer("risk", inputs, outputs=outputs)


def test_unknown_model(host: ModelHost) -> None:
    with pytest.raises(ModelNotFoundError):
        host.infer("ghost", {"features": np.ones((1, 4), np.float32)})


def test_memory_budget_unloads_least_recently_used(registry: ModelRegistry, tmp_path: Path) -> None:
    files = [onnx_models.mlp(tmp_path / f"m{i}.onnx", seed=i) for i in range(3)]
    for i, f in enumerate(files):
        registry.add(f, name=f"m{i}")
    size = max(registry.get(f"m{i}").size_bytes for i in range(3))
    host = ModelHost(registry, HostConfig(memory_budget_bytes=2 * size + size // 2))
    try:
        x = {"features": np.ones((1, 4), np.float32)}
        host.infer("m0", x)
        host.infer("m1", x)
        host.infer("m0", x)  # m1 is now the least recently used
        host.infer("m2", x)
        assert sorted(m.manifest.name for m in host.loaded()) == ["m0", "m2"]
        assert host.memory_used() <= host.config.memory_budget_bytes
        host.infer("m1", x)  # reloads, evicting m0
        assert sorted(m.manifest.name for m in host.loaded()) == ["m1", "m2"]
    finally:
        host.close()


def test_model_larger_than_the_budget_is_refused(registry: ModelRegistry, mlp_file: Path) -> None:
    registry.add(mlp_file, name="risk")
    host = ModelHost(registry, HostConfig(memory_budget_bytes=100))
    try:
        with pytest.raises(ResourceError, match="more than the whole model memory budget"):
            host.infer("risk", {"features": np.ones((1, 4), np.float32)})
    finally:
        host.close()


def test_concurrent_sync_calls_share_one_session(
    host: ModelHost, registry: ModelRegistry, mlp_file: Path
) -> None:
    registry.add(mlp_file, name="risk")
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((2, 4)).astype(np.float32) for _ in range(16)]
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        results[i] = host.infer("risk", {"features": xs[i]}).outputs["probabilities"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(host.loaded()) == 1
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(results[i], direct(mlp_file, x)[0])


def test_micro_batcher_gathers_concurrent_calls(
    registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        yaml.safe_dump({"batching": {"max_batch_size": 8, "max_queue_delay_ms": 20}})
    )
    registry.add(mlp_file, name="risk", manifest=manifest)
    host = ModelHost(registry, HostConfig(inference_threads=1))
    loaded = host.load("risk")
    batch_rows: list[int] = []
    real_run = loaded.run

    def counting_run(inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        batch_rows.append(next(iter(inputs.values())).shape[0])
        return real_run(inputs, outputs)

    loaded.run = counting_run  # type: ignore[method-assign]
    assert loaded.batcher is not None
    loaded.batcher._run = counting_run
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(8)]

    async def go() -> list[np.ndarray]:
        results = await asyncio.gather(*(host.infer_async("risk", {"features": x}) for x in xs))
        return [r.outputs["probabilities"] for r in results]

    outs = asyncio.run(go())
    host.close()
    assert sum(batch_rows) == 8
    assert len(batch_rows) < 8, f"calls were not batched: {batch_rows}"
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out, direct(mlp_file, x)[0], rtol=1e-6)


def test_registry_changes_by_another_process_are_noticed(
    host: ModelHost, registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    registry.add(mlp_file, name="risk")
    x = {"features": np.ones((1, 4), np.float32)}
    assert host.infer("risk", x).version == "1"
    # The CLI is another process with its own connection to the same file.
    with Database(registry.db.path) as other:
        cli_registry = ModelRegistry(other, registry.store)
        cli_registry.add(
            onnx_models.mlp(tmp_path / "v2.onnx", seed=9), name="risk", make_default=True
        )
    assert eventually(lambda: host.infer("risk", x).version == "2")
    with Database(registry.db.path) as other:
        ModelRegistry(other, registry.store).remove("risk", "1")
    assert eventually(lambda: [m.manifest.version for m in host.loaded()] == ["2"])


def test_changes_through_the_hosts_own_database_are_seen_at_once(
    host: ModelHost, registry: ModelRegistry, mlp_file: Path, tmp_path: Path
) -> None:
    registry.add(mlp_file, name="risk")
    x = {"features": np.ones((1, 4), np.float32)}
    assert host.infer("risk", x).version == "1"
    registry.add(onnx_models.mlp(tmp_path / "v2.onnx", seed=9), name="risk", make_default=True)
    assert host.infer("risk", x).version == "2"


def eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll ``check``: another process's registry changes are seen within a poll period."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_metrics_count_requests_errors_and_latency(registry: ModelRegistry, mlp_file: Path) -> None:
    metrics = MetricsRegistry()
    host = ModelHost(registry, HostConfig(), metrics)
    registry.add(mlp_file, name="risk")
    try:
        for _ in range(3):
            host.infer("risk", {"features": np.ones((1, 4), np.float32)})
        with pytest.raises(InvalidRequestError):
            host.infer("risk", {"features": np.ones((1, 3), np.float32)})
    finally:
        host.close()
    text = metrics.render()
    assert 'edgeos_inference_requests_total{model="risk",version="1"} 3' in text
    assert 'edgeos_inference_errors_total{model="risk",version="1"} 1' in text
    assert 'edgeos_inference_latency_seconds_count{model="risk",version="1"} 3' in text


def test_a_model_file_vanishing_mid_swap_is_unavailable_not_a_bad_request(
    registry: ModelRegistry, mlp_file: Path
) -> None:
    from edgeos.errors import UnavailableError

    record = registry.add(mlp_file, name="risk")
    registry.path(record).unlink()  # another process is replacing it
    host = ModelHost(registry, HostConfig())
    try:
        with pytest.raises(UnavailableError, match="try again") as info:
            host.infer("risk", {"features": np.ones((1, 4), np.float32)})
        assert info.value.http_status == 503
        registry.remove("risk")
        with pytest.raises(ModelNotFoundError):
            host.infer("risk", {"features": np.ones((1, 4), np.float32)})
    finally:
        host.close()
