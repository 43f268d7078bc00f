"""Generative model directories: what makes one valid, and registering one as a version.

A generative model is the directory ONNX Runtime GenAI loads: ``genai_config.json``, the
decoder ONNX file it names (with its KV cache as ``past``/``present`` tensors), and the
tokenizer. Registering checks all of it (the config's fields, the decoder's inputs and
outputs against the config, that ONNX Runtime GenAI loads it, that the memory budget
holds the weights and every running request's KV cache), copies the directory into the
model store under the hash of its contents, and adds the version's row: a refused
directory leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeos.errors import ConfigError, InvalidModelError, ManifestError
from edgeos.runtime.onnx_file import inspect_onnx
from edgeos.runtime.registry import ModelRegistry, insert_version, next_version

if TYPE_CHECKING:
    from edgeos.manifests import ModelManifest, ModelSpec

CONFIG_FILE = "genai_config.json"
TOKENIZER_FILE = "tokenizer.json"
MB = 1024 * 1024


@dataclass(frozen=True)
class DecoderConfig:
    """The facts of ``genai_config.json`` that edgeos relies on."""

    filename: str
    context_length: int
    vocab_size: int
    layers: int
    kv_heads: int
    head_size: int
    inputs: dict[str, str]
    outputs: dict[str, str]
    eos_ids: frozenset[int]

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of one request takes (keys and values, float32)."""
        return 2 * self.layers * self.kv_heads * self.head_size * 4

    def past_names(self) -> list[str]:
        """The decoder's past key and value input names, layer by layer."""
        return _layer_names(self.inputs, "past_key_names", "past_value_names", self.layers)

    def present_names(self) -> list[str]:
        """The decoder's present key and value output names, layer by layer."""
        return _layer_names(self.outputs, "present_key_names", "present_value_names", self.layers)


def _layer_names(names: dict[str, str], keys: str, values: str, layers: int) -> list[str]:
    return [pattern % i for i in range(layers) for pattern in (names[keys], names[values])]


def read_config(directory: Path) -> DecoderConfig:
    """Read and check ``genai_config.json``; InvalidModelError naming the file and field."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise InvalidModelError(f"{directory} is not a directory (a generative model is one)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InvalidModelError(f"{directory} has no {CONFIG_FILE}: not a GenAI model") from exc
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{path}: not readable JSON ({exc})") from exc

    def field(*keys: str, kind: type = int) -> Any:
        value: Any = raw
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidModelError(
                f"{path}: field '{'.'.join(keys)}' must be a {kind.__name__} (found {value!r})"
            )
        if isinstance(value, int) and value <= 0:
            raise InvalidModelError(f"{path}: field '{'.'.join(keys)}' must be positive")
        return value

    heads = field("model", "decoder", "num_attention_heads")
    kv_heads = raw["model"]["decoder"].get("num_key_value_heads", heads)
    config = DecoderConfig(
        filename=field("model", "decoder", "filename", kind=str),
        context_length=field("model", "context_length"),
        vocab_size=field("model", "vocab_size"),
        layers=field("model", "decoder", "num_hidden_layers"),
        kv_heads=kv_heads if isinstance(kv_heads, int) and kv_heads > 0 else heads,
        head_size=field("model", "decoder", "head_size"),
        inputs=field("model", "decoder", "inputs", kind=dict),
        outputs=field("model", "decoder", "outputs", kind=dict),
        eos_ids=_ids(raw["model"].get("eos_token_id"), path),
    )
    for group, keys in (
        ("inputs", ("input_ids", "past_key_names", "past_value_names")),
        ("outputs", ("logits", "present_key_names", "present_value_names")),
    ):
        names = getattr(config, group)
        for key in keys:
            if not isinstance(names.get(key), str):
                raise InvalidModelError(f"{path}: field 'model.decoder.{group}.{key}' is missing")
    return config


def _ids(value: Any, path: Path) -> frozenset[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InvalidModelError(f"{path}: field 'model.eos_token_id' must be a token id or a list")
    return frozenset(values)


def check_decoder(directory: Path, config: DecoderConfig) -> tuple[Any, int]:
    """The decoder's signature, checked against the config; and its size in bytes."""
    file = directory / config.filename
    if file.resolve().parent != directory.resolve():
        raise InvalidModelError(
            f"{directory / CONFIG_FILE}: decoder filename must name a file in it"
        )
    if not (directory / TOKENIZER_FILE).is_file():
        raise InvalidModelError(f"{directory} has no {TOKENIZER_FILE}")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InvalidModelError(f"cannot read the decoder {file}: {exc.strerror}") from exc
    signature = inspect_onnx(data, str(file))
    inputs = {t.name for t in signature.inputs}
    outputs = {t.name for t in signature.outputs}
    wanted_in = [config.inputs["input_ids"], *config.past_names()]
    wanted_out = [config.outputs["logits"], *config.present_names()]
    missing = [n for n in wanted_in if n not in inputs] + [
        n for n in wanted_out if n not in outputs
    ]
    if missing:
        raise InvalidModelError(
            f"{file}: {CONFIG_FILE} names tensors the decoder lacks: {', '.join(missing[:4])}"
        )
    return signature, len(data)


def memory_needed(weights: int, config: DecoderConfig, context: int, running: int) -> int:
    """Bytes for the weights plus the full KV cache of ``running`` requests at once."""
    return weights + running * context * config.kv_bytes_per_token


def load_genai(directory: Path) -> Any:
    """ONNX Runtime GenAI's model of a directory; errors translated."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise ConfigError(
            "generative models need onnxruntime-genai: pip install 'edgeos[genai]'"
        ) from exc
    try:
        return og.Model(str(directory))
    except Exception as exc:  # its errors are plain RuntimeError with a message
        raise InvalidModelError(f"{directory}: ONNX Runtime GenAI cannot load it: {exc}") from exc


def register_generative(
    registry: ModelRegistry,
    directory: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    manifest: Path | ModelSpec | None = None,
    make_default: bool | None = None,
) -> ModelManifest:
    """Validate a GenAI model directory and register it as a new version.

    Raises InvalidModelError, ManifestError, ConfigError or ConflictError and changes
    nothing when the directory or manifest is refused.
    """
    from edgeos.manifests import ModelSpec, load_manifest, validate_model_name, validate_version
    from edgeos.manifests.model import GenerationSpec, ModelManifest

    spec = load_manifest(manifest, ModelSpec) if isinstance(manifest, Path) else manifest
    spec = spec or ModelSpec(kind="generative", task="generation")
    source = str(manifest) if isinstance(manifest, Path) else "manifest"
    if spec.kind != "generative":
        raise ManifestError(source, ["field 'kind': a model directory is 'generative'"])
    if spec.name and name and spec.name != name:
        raise ManifestError(source, [f"field 'name': says {spec.name!r}, not {name!r}"])
    name = validate_model_name(name or spec.name or directory.name.lower())
    config = read_config(directory)
    signature, weights = check_decoder(directory, config)
    limits = spec.generation or GenerationSpec()
    context = limits.context_length or config.context_length
    if context > config.context_length:
        raise ManifestError(
            source,
            [f"field 'generation.context_length': {context} is over the model's "
             f"{config.context_length}"],
        )  # fmt: skip
    needed = memory_needed(weights, config, context, limits.max_running)
    if needed > limits.memory_budget_mb * MB:
        raise ManifestError(
            source,
            [f"field 'generation.memory_budget_mb': the weights and {limits.max_running} "
             f"running request(s) of {context} tokens need {needed / MB:.1f} MB, over the "
             f"budget of {limits.memory_budget_mb} MB"],
        )  # fmt: skip
    load_genai(directory)
    digest, size = _tree_digest(directory)
    limits = limits.model_copy(update={"context_length": context})
    fields = spec.model_dump(exclude={"name", "version", "inputs", "outputs", "generation"})
    fields.update(task="generation", kind="generative")
    target = registry.store / "genai" / digest
    copied = _store_tree(directory, target)
    try:
        with registry.db.transaction() as conn:
            # Under the write lock, as the registry's sweep deletes directories no row
            # refers to: one that was there a moment ago may be gone.
            if not target.exists():
                copied = _store_tree(directory, target)
            label = validate_version(version or spec.version or next_version(conn, name))
            record = ModelManifest(
                **fields, name=name, version=label, generation=limits,
                inputs=signature.inputs, outputs=signature.outputs, opset=signature.opset,
                size_bytes=size, sha256=digest,
            )  # fmt: skip
            insert_version(conn, record, make_default)
    except BaseException:
        if copied:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return record


def _files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _tree_digest(directory: Path) -> tuple[str, int]:
    """A hash of every file's relative path and bytes, and their total size."""
    digest, size = hashlib.sha256(), 0
    for path in _files(directory):
        data = path.read_bytes()
        size += len(data)
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest(), size


def _store_tree(directory: Path, target: Path) -> bool:
    """Copy the directory into the store durably; False if identical contents are there."""
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=target.parent))
    try:
        for path in _files(directory):
            copy = staging / path.relative_to(directory)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
            with open(copy, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True
