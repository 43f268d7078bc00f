"""Agent bundles: a directory with ``agent.yaml`` and a Python module of step functions.

A bundle is checked completely before anything is installed: the manifest, the module,
every step, every model and every connector it names. Installing copies it under the
node's data directory, so the node never runs code from a directory that may change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from edgeos.errors import ManifestError

if TYPE_CHECKING:
    from edgeos.manifests.agent import AgentManifest

StepFn = Callable[..., Any]


@dataclass(frozen=True)
class AgentBundle:
    """A loaded bundle: its manifest, where it lives, and its step functions by name."""

    manifest: AgentManifest
    directory: Path
    steps: dict[str, StepFn]
    digest: str


def bundle_digest(directory: Path) -> str:
    """sha256 over the bundle's files (names and bytes), to tell versions apart."""
    h = hashlib.sha256()
    for path in sorted(
        p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    ):
        h.update(str(path.relative_to(directory)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def load_bundle(directory: Path) -> AgentBundle:
    """Read and check a bundle; ManifestError names the file, field and reason."""
    # Imported here: with no agent installed the node never needs pydantic.
    from edgeos.manifests import load_manifest
    from edgeos.manifests.agent import AgentManifest

    manifest_path = directory / "agent.yaml"
    if not manifest_path.is_file():
        raise ManifestError(str(directory), ["no agent.yaml in the bundle"])
    manifest = load_manifest(manifest_path, AgentManifest)
    module_path = directory / manifest.module
    if not module_path.is_file():
        raise ManifestError(
            str(manifest_path), [f"field 'module': {manifest.module} is not in the bundle"]
        )
    module = _import(module_path, manifest, manifest_path)
    steps: dict[str, StepFn] = {}
    problems = []
    for index, name in enumerate(manifest.steps):
        fn = getattr(module, name, None)
        if not callable(fn):
            problems.append(f"field 'steps.{index}': {manifest.module} has no function {name!r}")
            continue
        params = [
            p for p in inspect.signature(fn).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]  # fmt: skip
        if len(params) != 2:
            problems.append(
                f"field 'steps.{index}': {name}() must take (ctx, data), "
                f"it takes {len(params)} required argument(s)"
            )
        steps[name] = fn
    if problems:
        raise ManifestError(str(manifest_path), problems)
    return AgentBundle(manifest, directory, steps, bundle_digest(directory))


def check_references(
    bundle: AgentBundle, *, models: Iterable[str], connectors: Iterable[str]
) -> None:
    """Every model and connector the manifest names must exist on this node."""
    source = str(bundle.directory / "agent.yaml")
    known_models, known_connectors = set(models), set(connectors)
    problems = [
        f"field 'models.{i}': model {m!r} is not registered on this node"
        for i, m in enumerate(bundle.manifest.models)
        if m not in known_models
    ]
    problems += [
        f"field 'connectors.{i}': connector {c!r} is not bound on this node (connectors.yaml)"
        for i, c in enumerate(bundle.manifest.connectors)
        if c not in known_connectors
    ]
    if problems:
        raise ManifestError(source, problems)


def install_copy(bundle: AgentBundle, agents_dir: Path) -> Path:
    """Copy the bundle to ``agents_dir/<name>/<digest>``; returns the copy's directory."""
    target = agents_dir / bundle.manifest.name / bundle.digest[:16]
    if not target.exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(
            bundle.directory, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        tmp.rename(target)
    return target


def _import(path: Path, manifest: AgentManifest, manifest_path: Path) -> ModuleType:
    # A unique module name per bundle copy: two versions of one agent can be loaded at once.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"edgeos_agent_{manifest.name.replace('-', '_').replace('.', '_')}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ManifestError(str(manifest_path), [f"field 'module': cannot import {path.name}"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the agent's own code failed to import
        sys.modules.pop(name, None)
        raise ManifestError(
            str(manifest_path),
            [f"field 'module': importing {path.name} failed: {type(exc).__name__}: {exc}"],
        ) from exc
    return module
