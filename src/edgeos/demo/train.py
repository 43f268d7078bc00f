"""Train the demo stockout-risk classifiers with numpy and export them to ONNX.

Two multilayer perceptrons learn the :mod:`edgeos.demo.retail` data set: ``stockout-risk``,
a few-hundred-parameter model sized for an edge device, and ``stockout-risk-xl``, a larger
and measurably more accurate one that plays the cloud model. Training is mini-batch Adam
on softmax cross-entropy with early stopping on a validation split; feature
standardisation is folded into the exported graph, so the models take raw features.

``python -m edgeos.demo.train --out DIR`` builds both models, their manifests, a held-out
evaluation set and the metrics in ``DIR`` in about 15 seconds on two cores; once they
exist, running it again does nothing unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from edgeos.demo.retail import FEATURE_NAMES, RetailDataset, generate
from edgeos.files import write_atomic

INPUT_NAME = "features"
"""Name of the models' only input: float32 ``[batch, len(FEATURE_NAMES)]`` raw features."""

OUTPUT_NAME = "probabilities"
"""Name of the models' only output: float32 ``[batch, 2]``, rows summing to 1."""

LABELS: tuple[str, str] = ("in_stock", "stockout")
"""Class names, in the order of the output columns."""

OPSET = 17
# IR 8 is the version that introduced opset 17; any onnxruntime able to run opset 17
# loads it, which a newer default IR version would not guarantee.
IR_VERSION = 8
DEFAULT_ROWS = 150_000
"""Rows simulated by default: enough for the XL model to pull clearly ahead."""

EVAL_ROWS = 2_000
"""Rows held out for ``eval.npz`` (a fifth of the data when that is fewer)."""

_VALIDATION_FRACTION = 0.15
_METRICS_FORMAT = 1


@dataclass(frozen=True)
class ModelSpec:
    """Architecture, training settings and manifest fields of one demo model."""

    name: str
    hidden: tuple[int, ...]
    description: str
    cost_per_call: float
    learning_rate: float
    batch_size: int
    max_epochs: int
    patience: int
    weight_decay: float = 0.0


SMALL = ModelSpec(
    name="stockout-risk",
    hidden=(8,),
    description=(
        "Probability that a store/SKU runs out of stock within its supplier lead time. "
        "Small edge model trained on simulated retail data."
    ),
    cost_per_call=0.0,
    learning_rate=3e-3,
    batch_size=256,
    max_epochs=60,
    patience=6,
)
"""The edge model: one hidden layer of 8 units."""

XL = ModelSpec(
    name="stockout-risk-xl",
    hidden=(256, 256),
    description=(
        "Probability that a store/SKU runs out of stock within its supplier lead time. "
        "Large, more accurate variant served from the cloud."
    ),
    cost_per_call=0.0004,
    learning_rate=2e-3,
    batch_size=512,
    max_epochs=15,
    patience=4,
    weight_decay=1e-2,
)
"""The cloud model: two hidden layers of 256 units."""

SPECS: tuple[ModelSpec, ...] = (SMALL, XL)
"""Every model :func:`build_demo_models` produces."""


@dataclass(frozen=True, eq=False)
class MLP:
    """A trained ReLU perceptron with softmax output, including its input standardisation."""

    mean: NDArray[np.float32]
    scale: NDArray[np.float32]
    weights: tuple[NDArray[np.float32], ...]
    biases: tuple[NDArray[np.float32], ...]

    @property
    def n_parameters(self) -> int:
        """Trainable parameters (weights and biases, not the standardisation)."""
        return sum(w.size + b.size for w, b in zip(self.weights, self.biases, strict=True))

    def predict_proba(self, features: NDArray[np.float32]) -> NDArray[np.float32]:
        """Class probabilities ``[n, 2]`` for raw features ``[n, F]``, as the ONNX graph does."""
        return _forward(self.weights, self.biases, (features - self.mean) / self.scale)[-1]

    @classmethod
    def from_onnx(cls, model: onnx.ModelProto) -> MLP:
        """Read the parameters back from a model written by :meth:`to_onnx`."""
        arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        n_hidden = sum(
            1 for name in arrays if name.startswith("hidden") and name.endswith(".weight")
        )
        layers = [f"hidden{i}" for i in range(n_hidden)] + ["output"]
        return cls(
            arrays["input_mean"],
            arrays["input_scale"],
            tuple(arrays[f"{layer}.weight"] for layer in layers),
            tuple(arrays[f"{layer}.bias"] for layer in layers),
        )

    def to_onnx(self, name: str, description: str) -> onnx.ModelProto:
        """Export as a checked ONNX model with input ``features`` and output ``probabilities``."""
        inits = [
            numpy_helper.from_array(self.mean, "input_mean"),
            numpy_helper.from_array(self.scale, "input_scale"),
        ]
        nodes = [
            helper.make_node(
                "Sub", [INPUT_NAME, "input_mean"], ["centered"], name="standardize_sub"
            ),
            helper.make_node(
                "Div", ["centered", "input_scale"], ["standardized"], name="standardize_div"
            ),
        ]
        current = "standardized"
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            layer = "output" if i == last else f"hidden{i}"
            inits += [
                numpy_helper.from_array(w, f"{layer}.weight"),
                numpy_helper.from_array(b, f"{layer}.bias"),
            ]
            gemm_out = "logits" if i == last else f"{layer}.linear"
            nodes.append(
                helper.make_node(
                    "Gemm", [current, f"{layer}.weight", f"{layer}.bias"], [gemm_out], name=layer
                )
            )
            current = gemm_out
            if i != last:
                current = f"{layer}.relu"
                nodes.append(helper.make_node("Relu", [gemm_out], [current], name=current))
        nodes.append(helper.make_node("Softmax", [current], [OUTPUT_NAME], axis=1, name="softmax"))
        graph = helper.make_graph(
            nodes,
            name,
            inputs=[
                helper.make_tensor_value_info(
                    INPUT_NAME, TensorProto.FLOAT, ["batch", len(self.mean)]
                )
            ],
            outputs=[
                helper.make_tensor_value_info(
                    OUTPUT_NAME, TensorProto.FLOAT, ["batch", len(LABELS)]
                )
            ],
            initializer=inits,
            doc_string=description,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="edgeos.demo.train",
            ir_version=IR_VERSION,
            doc_string=description,
        )
        helper.set_model_props(
            model, {"feature_names": ",".join(FEATURE_NAMES), "labels": ",".join(LABELS)}
        )
        onnx.checker.check_model(model, full_check=True)
        return model


def _forward(
    weights: Sequence[NDArray[np.float32]],
    biases: Sequence[NDArray[np.float32]],
    standardized: NDArray[np.float32],
) -> list[NDArray[np.float32]]:
    """Every layer's output for standardised inputs; the last entry is the softmax."""
    outputs = [standardized]
    for w, b in zip(weights[:-1], biases[:-1], strict=True):
        outputs.append(np.maximum(outputs[-1] @ w + b, np.float32(0)))
    logits = outputs[-1] @ weights[-1] + biases[-1]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    outputs.append(exp / exp.sum(axis=1, keepdims=True))
    return outputs


def _cross_entropy(probabilities: NDArray[np.float32], labels: NDArray[np.int64]) -> float:
    picked = probabilities[np.arange(labels.size), labels]
    return float(-np.log(np.maximum(picked, 1e-7)).mean())


def train_mlp(
    train: RetailDataset, validation: RetailDataset, spec: ModelSpec, *, seed: int
) -> MLP:
    """Fit an MLP shaped by ``spec`` on ``train``; keep the weights best on ``validation``.

    Training stops once the validation loss has not improved for ``spec.patience`` epochs.
    The result depends only on the data, ``spec`` and ``seed``.
    """
    rng = np.random.default_rng(seed)
    mean = train.features.mean(axis=0, dtype=np.float64).astype(np.float32)
    # Constant columns keep a scale of 1 rather than dividing by zero.
    std = train.features.std(axis=0, dtype=np.float64)
    scale = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    x = (train.features - mean) / scale
    x_val = (validation.features - mean) / scale
    y, y_val = train.labels, validation.labels

    sizes = (x.shape[1], *spec.hidden, len(LABELS))
    # He initialisation suits ReLU layers.
    params: list[NDArray[np.float32]] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        params.append(
            (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        )
        params.append(np.zeros(fan_out, np.float32))
    first_moment = [np.zeros_like(p) for p in params]
    second_moment = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0

    best_loss, best_params, stale = np.inf, [p.copy() for p in params], 0
    for epoch in range(spec.max_epochs):
        # Cosine decay: big steps while far from a minimum, small ones to settle into it.
        learning_rate = spec.learning_rate * 0.5 * (1 + np.cos(np.pi * epoch / spec.max_epochs))
        order = rng.permutation(len(y))
        for start in range(0, len(y), spec.batch_size):
            batch = order[start : start + spec.batch_size]
            outputs = _forward(params[0::2], params[1::2], x[batch])
            # Gradient of mean cross-entropy with respect to the logits.
            delta = outputs[-1].copy()
            delta[np.arange(batch.size), y[batch]] -= 1.0
            delta /= np.float32(batch.size)
            grads: list[NDArray[np.float32]] = [np.empty(0, np.float32)] * len(params)
            for layer in range(len(sizes) - 2, -1, -1):
                grads[2 * layer] = outputs[layer].T @ delta
                grads[2 * layer + 1] = delta.sum(axis=0)
                if layer:
                    delta = (delta @ params[2 * layer].T) * (outputs[layer] > 0)
            step += 1
            lr = learning_rate * np.sqrt(1 - beta2**step) / (1 - beta1**step)
            for p, g, m, v in zip(params, grads, first_moment, second_moment, strict=True):
                m *= beta1
                m += (1 - beta1) * g
                v *= beta2
                v += (1 - beta2) * g * g
                if spec.weight_decay and p.ndim == 2:
                    # Decoupled (AdamW) decay on weights only, not biases.
                    p -= np.float32(learning_rate * spec.weight_decay) * p
                p -= (lr * m / (np.sqrt(v) + eps)).astype(np.float32)
        val_loss = _cross_entropy(_forward(params[0::2], params[1::2], x_val)[-1], y_val)
        if val_loss < best_loss - 1e-5:
            best_loss, best_params, stale = val_loss, [p.copy() for p in params], 0
        else:
            stale += 1
            if stale >= spec.patience:
                break
    return MLP(mean, scale, tuple(best_params[0::2]), tuple(best_params[1::2]))


def roc_auc(labels: NDArray[np.int64], scores: NDArray[np.floating[Any]]) -> float:
    """Area under the ROC curve (Mann-Whitney statistic, ties counted as one half)."""
    positives = int(labels.sum())
    negatives = labels.size - positives
    if not positives or not negatives:
        raise ValueError("AUC needs both classes")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, np.float64)
    # Tied scores share the mean of the ranks they span.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    rank_sum = ranks[labels == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


@dataclass(frozen=True)
class ModelMetrics:
    """Quality of one model on the held-out evaluation set."""

    accuracy: float
    auc: float
    parameters: int
    hidden: tuple[int, ...]


def evaluate(model: bytes, dataset: RetailDataset) -> tuple[float, float]:
    """Accuracy (argmax) and ROC AUC on ``dataset`` of a serialized ONNX model.

    Scored in onnxruntime, as a node runs the model, so the figures are those of the
    shipped file.
    """
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (probabilities,) = session.run([OUTPUT_NAME], {INPUT_NAME: dataset.features})
    accuracy = float((probabilities.argmax(axis=1) == dataset.labels).mean())
    return accuracy, roc_auc(dataset.labels, probabilities[:, 1])


@dataclass(frozen=True)
class DemoModels:
    """The files :func:`build_demo_models` produced and how good the models are."""

    out_dir: Path
    models: Mapping[str, Path]
    """ONNX file of each model, by model name."""
    manifests: Mapping[str, Path]
    """YAML manifest of each model, by model name."""
    eval_set: Path
    """``.npz`` with the held-out ``features`` and ``labels``."""
    metrics_file: Path
    metrics: Mapping[str, ModelMetrics]
    """Quality of each model on the evaluation set, by model name."""
    rows: int
    """Rows the models were built from (read back from ``metrics.json`` if not rebuilt)."""
    seed: int
    rebuilt: bool
    """False when every file was already there and nothing was trained."""


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old file or the new one, never half."""
    write_atomic(path, data, 0o644, dir_mode=0o755)  # shareable artefacts


def _manifest(spec: ModelSpec) -> dict[str, Any]:
    # Name, version, inputs and outputs are left out on purpose: the registry reads
    # them from the file, and a second copy here could only disagree.
    return {
        "task": "classification",
        "description": spec.description,
        "labels": list(LABELS),
        "privacy": "internal",
        "cost_per_call": spec.cost_per_call,
        "execution_providers": ["CPUExecutionProvider"],
    }


def _load_metrics(metrics_file: Path) -> tuple[dict[str, ModelMetrics], int, int] | None:
    """Metrics, rows and seed of an earlier complete build, or None if there is none."""
    try:
        recorded = json.loads(metrics_file.read_text())
        if recorded["format"] != _METRICS_FORMAT:
            return None
        metrics = {
            s.name: ModelMetrics(
                accuracy=float(recorded["models"][s.name]["accuracy"]),
                auc=float(recorded["models"][s.name]["auc"]),
                parameters=int(recorded["models"][s.name]["parameters"]),
                hidden=tuple(int(h) for h in recorded["models"][s.name]["hidden"]),
            )
            for s in SPECS
        }
        return metrics, int(recorded["rows"]), int(recorded["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_demo_models(
    out_dir: Path,
    *,
    rows: int = DEFAULT_ROWS,
    seed: int = 7,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> DemoModels:
    """Generate retail data, train both demo models and write them to ``out_dir``.

    Writes ``<name>.onnx`` and ``<name>.yaml`` for each model in :data:`SPECS`,
    ``eval.npz`` (about 2,000 held-out ``features`` and ``labels``) and ``metrics.json``.
    When all of them exist and ``force`` is False, nothing is retrained or rewritten,
    whatever ``rows`` and ``seed`` say: the result reports what the files were built
    from. Each file is replaced atomically, and ``metrics.json`` is removed first and
    written last, so a build interrupted halfway is redone by the next call. The same
    ``rows`` and ``seed`` give byte-identical files.
    """
    if rows < 100:
        raise ValueError("rows must be at least 100")
    report = progress or (lambda _message: None)
    out_dir = Path(out_dir)
    models = {s.name: out_dir / f"{s.name}.onnx" for s in SPECS}
    manifests = {s.name: out_dir / f"{s.name}.yaml" for s in SPECS}
    eval_path, metrics_file = out_dir / "eval.npz", out_dir / "metrics.json"
    outputs = [*models.values(), *manifests.values(), eval_path, metrics_file]
    if not force and all(p.is_file() for p in outputs):
        recorded = _load_metrics(metrics_file)
        if recorded is not None:
            report(f"demo models in {out_dir} are up to date")
            return DemoModels(
                out_dir, models, manifests, eval_path, metrics_file, *recorded, rebuilt=False
            )

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_file.unlink(missing_ok=True)
    report(f"simulating {rows} retail observations (seed {seed})")
    dataset = generate(rows, seed)
    eval_set, rest = dataset.split(min(EVAL_ROWS, rows // 5) / rows, seed)
    validation, train = rest.split(_VALIDATION_FRACTION, seed + 1)

    metrics: dict[str, ModelMetrics] = {}
    for index, spec in enumerate(SPECS):
        report(f"training {spec.name} (hidden layers {list(spec.hidden)}) on {len(train)} rows")
        model = train_mlp(train, validation, spec, seed=seed * 100 + index)
        onnx_bytes = model.to_onnx(spec.name, spec.description).SerializeToString()
        accuracy, auc = evaluate(onnx_bytes, eval_set)
        metrics[spec.name] = ModelMetrics(accuracy, auc, model.n_parameters, spec.hidden)
        _atomic_write(models[spec.name], onnx_bytes)
        _atomic_write(
            manifests[spec.name], yaml.safe_dump(_manifest(spec), sort_keys=False).encode()
        )

    buffer = io.BytesIO()
    np.savez(buffer, features=eval_set.features, labels=eval_set.labels)
    _atomic_write(eval_path, buffer.getvalue())
    summary = {
        "format": _METRICS_FORMAT,
        "rows": rows,
        "seed": seed,
        "eval_rows": len(eval_set),
        "eval_positive_rate": eval_set.positive_rate,
        "feature_names": list(FEATURE_NAMES),
        "models": {
            name: {
                "accuracy": m.accuracy,
                "auc": m.auc,
                "parameters": m.parameters,
                "hidden": list(m.hidden),
            }
            for name, m in metrics.items()
        },
    }
    _atomic_write(metrics_file, (json.dumps(summary, indent=2) + "\n").encode())
    return DemoModels(
        out_dir, models, manifests, eval_path, metrics_file, metrics, rows, seed, rebuilt=True
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: build the demo models and print a summary."""
    parser = argparse.ArgumentParser(
        prog="python -m edgeos.demo.train",
        description="Build the demo stockout-risk models from simulated retail data.",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="observations to simulate")
    parser.add_argument("--seed", type=int, default=7, help="seed for data and training")
    parser.add_argument("--force", action="store_true", help="rebuild even if files exist")
    args = parser.parse_args(argv)
    if args.rows < 100:
        parser.error("--rows must be at least 100")

    started = time.perf_counter()
    built = build_demo_models(
        args.out, rows=args.rows, seed=args.seed, force=args.force, progress=print
    )
    for name, m in built.metrics.items():
        print(
            f"{name:18s} accuracy {m.accuracy:.3f}  AUC {m.auc:.3f}  "
            f"{m.parameters} parameters  {built.models[name].stat().st_size} bytes"
        )
    verb = "built" if built.rebuilt else "already up to date"
    print(f"{verb} in {built.out_dir} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
