"""INT8 quantization with a verdict: keep the INT8 version only where it pays here.

INT8 is not always faster than FP32 (it depends on the CPU and the model), and it can
cost accuracy. So a quantized version is always registered, but made the default only
when it is measurably faster on this machine and loses at most ``max_accuracy_drop``
points of accuracy on the evaluation set.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeos.errors import ConflictError, InvalidRequestError, QuantizationError
from edgeos.manifests import ModelManifest
from edgeos.runtime.profile import sample_inputs
from edgeos.runtime.registry import ModelRegistry
from edgeos.runtime.sessions import HostConfig, create_session
from edgeos.telemetry.stats import LatencySummary, time_calls

Mode = Literal["static", "dynamic"]
Array = np.ndarray[Any, Any]

# INT8 must beat FP32 by this much at p50 to count as faster: less is timing noise.
SPEEDUP_MARGIN = 0.05


@dataclass(frozen=True)
class EvalSet:
    """Inputs for calibration and evaluation, with labels when accuracy can be scored."""

    inputs: dict[str, Array]
    labels: Array | None
    source: str

    @property
    def rows(self) -> int:
        """Number of examples."""
        return int(next(iter(self.inputs.values())).shape[0])


@dataclass
class QuantizeReport:
    """What quantization produced and why the INT8 version is (not) the default."""

    name: str
    source_version: str
    version: str
    mode: Mode
    fp32_bytes: int
    int8_bytes: int
    fp32_latency: LatencySummary
    int8_latency: LatencySummary
    fp32_accuracy: float | None
    int8_accuracy: float | None
    agreement: float
    made_default: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        """INT8 size over FP32 size."""
        return self.int8_bytes / self.fp32_bytes

    @property
    def accuracy_delta(self) -> float | None:
        """INT8 accuracy minus FP32 accuracy, in percentage points."""
        if self.fp32_accuracy is None or self.int8_accuracy is None:
            return None
        return (self.int8_accuracy - self.fp32_accuracy) * 100


def load_eval_set(path: Path, manifest: ModelManifest) -> EvalSet:
    """Read an ``.npz`` file holding one array per model input and optionally ``labels``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"{path} is not a readable .npz evaluation set: {exc}") from exc
    labels = arrays.pop("labels", None)
    missing = [s.name for s in manifest.inputs if s.name not in arrays]
    if missing:
        raise InvalidRequestError(
            f"{path}: no array for model input(s) {', '.join(missing)} "
            f"(arrays: {', '.join(sorted(arrays)) or 'none'})"
        )
    inputs = {s.name: arrays[s.name] for s in manifest.inputs}
    rows = {a.shape[0] for a in inputs.values()} | (
        {labels.shape[0]} if labels is not None else set()
    )
    if len(rows) != 1:
        raise InvalidRequestError(f"{path}: arrays disagree on the number of examples: {rows}")
    return EvalSet(inputs, labels, str(path))


def quantize_model(
    registry: ModelRegistry,
    name: str,
    version: str | None = None,
    *,
    mode: Mode = "static",
    eval_set: EvalSet | None = None,
    max_accuracy_drop: float = 1.0,
    config: HostConfig | None = None,
    iterations: int = 300,
) -> QuantizeReport:
    """Quantize a registered version to INT8, register the result, and judge it.

    Static mode writes QDQ with signed 8-bit activations and weights (S8S8), calibrated on
    the evaluation set; dynamic mode quantizes weights ahead and activations at run time.
    Without an evaluation set, calibration uses random inputs and the INT8 version is
    never made default, since its accuracy is unknown.
    """
    config = config or HostConfig()
    source = registry.get(name, version)
    new_version = f"{source.version}-int8" + ("" if mode == "static" else "-dyn")
    existing = {m.version for m in registry.versions(name)}
    if new_version in existing:
        raise ConflictError(
            f"model '{name}' already has version '{new_version}'; remove it to quantize again"
        )
    data = eval_set or EvalSet(sample_inputs(source, 256, seed=1), None, "random inputs")
    with tempfile.TemporaryDirectory(prefix="edgeos-quantize-") as tmp:
        out = Path(tmp) / "int8.onnx"
        _quantize_file(registry.path(source), out, mode, data, Path(tmp))
        fp32 = create_session(registry.path(source), config, source.execution_providers)
        int8 = create_session(out, config, source.execution_providers, what="quantized model")
        outputs = [o.name for o in source.outputs]
        fp32_out = _predict(fp32, data, outputs[0])
        int8_out = _predict(int8, data, outputs[0])
        one = {k: v[:1] for k, v in data.inputs.items()}
        fp32_lat = LatencySummary.of(
            time_calls(lambda: fp32.run(outputs, one), iterations=iterations, max_seconds=10)
        )
        int8_lat = LatencySummary.of(
            time_calls(lambda: int8.run(outputs, one), iterations=iterations, max_seconds=10)
        )
        report = QuantizeReport(
            name=name,
            source_version=source.version,
            version=new_version,
            mode=mode,
            fp32_bytes=source.size_bytes,
            int8_bytes=out.stat().st_size,
            fp32_latency=fp32_lat,
            int8_latency=int8_lat,
            fp32_accuracy=_accuracy(source, fp32_out, data.labels),
            int8_accuracy=_accuracy(source, int8_out, data.labels),
            agreement=_agreement(source, fp32_out, int8_out),
            made_default=False,
        )
        report.reasons = _verdict(report, eval_set is not None, max_accuracy_drop)
        report.made_default = not report.reasons
        registry.add(
            out,
            name=name,
            version=new_version,
            manifest=source.spec(),
            make_default=report.made_default,
            quantization=f"int8-{mode}" + ("-qdq-s8s8" if mode == "static" else ""),
            derived_from=source.version,
        )
    return report


def _quantize_file(src: Path, dst: Path, mode: Mode, data: EvalSet, tmp: Path) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = tmp / "prepared.onnx"
    try:
        # Shape inference and graph fusion first, as ONNX Runtime recommends.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8)
            return

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                rows = min(data.rows, 512)
                self._batches = iter(
                    [{k: v[i : i + 32] for k, v in data.inputs.items()} for i in range(0, rows, 32)]
                )

            def get_next(self) -> dict[str, Array] | None:
                return next(self._batches, None)

        quantize_static(
            str(prepared),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    except Exception as exc:  # ORT's quantizer raises many plain exception types
        raise QuantizationError(f"quantizing {src.name} ({mode}) failed: {exc}") from exc


def _predict(session: Any, data: EvalSet, output: str) -> Array:
    parts = []
    for start in range(0, data.rows, 256):
        batch = {k: v[start : start + 256] for k, v in data.inputs.items()}
        parts.append(session.run([output], batch)[0])
    return np.concatenate(parts)


def _accuracy(manifest: ModelManifest, scores: Array, labels: Array | None) -> float | None:
    if labels is None or manifest.task != "classification" or scores.ndim != 2:
        return None
    return float(np.mean(np.argmax(scores, axis=1) == labels))


def _agreement(manifest: ModelManifest, a: Array, b: Array) -> float:
    """How often INT8 gives FP32's answer: same class, or within 1% for other tasks."""
    if manifest.task == "classification" and a.ndim == 2:
        return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
    close = np.isclose(a, b, rtol=0.01, atol=1e-3)
    return float(np.mean(close))


def _verdict(report: QuantizeReport, evaluated: bool, max_drop: float) -> list[str]:
    reasons = []
    if not evaluated:
        reasons.append("no evaluation set was given, so the accuracy of INT8 is unknown")
    elif report.accuracy_delta is None:
        reasons.append("accuracy cannot be scored (needs a classification model and labels)")
    elif report.accuracy_delta < -max_drop:
        reasons.append(
            f"accuracy drops {-report.accuracy_delta:.2f} points, more than the "
            f"{max_drop:g} allowed"
        )
    fp32, int8 = report.fp32_latency.p50_ms, report.int8_latency.p50_ms
    if int8 > fp32 * (1 - SPEEDUP_MARGIN):
        reasons.append(
            f"INT8 is not faster on this machine (p50 {int8:.3f} ms vs FP32 {fp32:.3f} ms)"
        )
    return reasons
