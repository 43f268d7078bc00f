"""Publishing artifacts: check the bytes are what the kind says, then sign them into TUF.

An agent is a tar.gz of a bundle directory (``agent.yaml`` and its module); a model a
tar.gz of ``model.yaml`` and one ``.onnx`` file; a policy a YAML document with
``kind: policy``. The manifest's name and version must be the ones published. The
fleet never runs an agent's code: the module is parsed, not imported, to check that
every step the manifest names is a function in it.
"""

from __future__ import annotations

import ast
import hashlib
import time
from typing import Any

import sqlalchemy as sa
import yaml
from sqlalchemy.engine import Connection

from edgeos.errors import ConflictError, EdgeOSError, InvalidModelError, ManifestError
from edgeos.fleet import tables
from edgeos.fleet.context import FleetContext
from edgeos.fleet.db import audit_refusal, write_audit
from edgeos.fleet.packing import read_archive
from edgeos.protocol.fleet import ArtifactRef


def target_path(ref: ArtifactRef) -> str:
    """The artifact's TUF target path (see docs/fleet.md)."""
    if ref.kind == "policy":
        return f"policies/{ref.name}/{ref.version}.yaml"
    return f"{ref.kind}s/{ref.name}/{ref.version}.tar.gz"


def check_artifact(ref: ArtifactRef, data: bytes, *, max_bytes: int) -> None:
    """Raise (ManifestError, InvalidModelError, VerificationError) unless ``data`` is a
    well-formed ``ref.kind`` whose manifest names ``ref``; errors name file and field."""
    if ref.kind == "policy":
        _check_policy(ref, data)
        return
    files = read_archive(data, f"{ref}", max_bytes=max_bytes)
    if ref.kind == "agent":
        _check_agent(ref, files)
    else:
        _check_model(ref, files)


def _yaml(ref: ArtifactRef, files: dict[str, bytes], name: str) -> Any:
    source = f"{ref}: {name}"
    if name not in files:
        raise ManifestError(f"{ref}", [f"no {name} at the top of the archive"])
    try:
        return yaml.safe_load(files[name].decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ManifestError(source, [f"not valid YAML ({exc})"]) from exc


def _same_identity(ref: ArtifactRef, source: str, name: Any, version: Any) -> None:
    problems = []
    if name is not None and str(name) != ref.name:
        problems.append(f"field 'name': {name!r} differs from the published name {ref.name!r}")
    if version is not None and str(version) != ref.version:
        problems.append(
            f"field 'version': {version!r} differs from the published version {ref.version!r}"
        )
    if problems:
        raise ManifestError(source, problems)


def _check_agent(ref: ArtifactRef, files: dict[str, bytes]) -> None:
    from edgeos.manifests import parse_manifest
    from edgeos.manifests.agent import AgentManifest

    source = f"{ref}: agent.yaml"
    manifest = parse_manifest(_yaml(ref, files, "agent.yaml"), AgentManifest, source)
    _same_identity(ref, source, manifest.name, manifest.version)
    module = files.get(manifest.module)
    if module is None:
        raise ManifestError(source, [f"field 'module': {manifest.module} is not in the bundle"])
    try:
        tree = ast.parse(module, filename=manifest.module)
    except (SyntaxError, ValueError) as exc:
        raise ManifestError(f"{ref}: {manifest.module}", [f"not valid Python ({exc})"]) from exc
    defined = {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    missing = [
        f"field 'steps.{i}': {manifest.module} defines no function {step!r}"
        for i, step in enumerate(manifest.steps)
        if step not in defined
    ]
    if missing:
        raise ManifestError(source, missing)


def _check_model(ref: ArtifactRef, files: dict[str, bytes]) -> None:
    from edgeos.manifests import ModelSpec, parse_manifest

    source = f"{ref}: model.yaml"
    spec = parse_manifest(_yaml(ref, files, "model.yaml"), ModelSpec, source)
    _same_identity(ref, source, spec.name, spec.version)
    onnx_files = [name for name in files if name.endswith(".onnx")]
    if len(onnx_files) != 1:
        raise ManifestError(
            f"{ref}", [f"a model archive holds exactly one .onnx file, this one {len(onnx_files)}"]
        )
    # Imported here: only a fleet that publishes a model pays for onnx.
    import onnx

    try:
        model = onnx.load_from_string(files[onnx_files[0]])
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError and others
        raise InvalidModelError(
            f"{ref}: {onnx_files[0]} is not a valid ONNX model ({type(exc).__name__}: {exc})"
        ) from exc


def _check_policy(ref: ArtifactRef, data: bytes) -> None:
    from edgeos.manifests.policy import load_policy_text

    source = f"{ref}: policy YAML"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(source, ["not UTF-8 text"]) from exc
    policy = load_policy_text(text, source)
    _same_identity(ref, source, policy.name, policy.version)


def _existing(conn: Connection, ref: ArtifactRef) -> dict[str, Any] | None:
    a = tables.artifacts
    row = (
        conn.execute(
            sa.select(a).where(
                a.c.kind == ref.kind, a.c.name == ref.name, a.c.version == ref.version
            )
        )
        .mappings()
        .first()
    )
    return None if row is None else dict(row)


def publish(ctx: FleetContext, ref: ArtifactRef, data: bytes, *, actor: str) -> dict[str, Any]:
    """Check and publish one artifact version; returns its row.

    The same bytes again return the published row; other bytes for a published version
    are a ConflictError. The TUF target is added before the row is written: if the
    process dies between the two, publishing again completes it (adding the same target
    is a no-op).
    """
    sha256 = hashlib.sha256(data).hexdigest()
    target = f"artifact/{ref}"
    try:
        with ctx.db.read() as conn:
            existing = _existing(conn, ref)
        if existing is not None:
            if existing["sha256"] == sha256:
                return existing
            raise ConflictError(
                f"{ref} is published already with other bytes (sha256 {existing['sha256'][:12]}...); "
                "publish a new version"
            )
        check_artifact(ref, data, max_bytes=ctx.config.max_artifact_bytes * 4)
        info = ctx.tuf.add_target(
            target_path(ref), data, {"kind": ref.kind, "name": ref.name, "version": ref.version}
        )
        row = {
            "kind": ref.kind, "name": ref.name, "version": ref.version, "target": info.path,
            "sha256": info.sha256, "length": info.length, "published_at": time.time(),
            "published_by": actor,
        }  # fmt: skip
        with ctx.db.begin() as conn:
            if _existing(conn, ref) is not None:  # a concurrent publish of the same bytes
                return row
            conn.execute(sa.insert(tables.artifacts).values(**row))
            write_audit(conn, actor=actor, action="publish", target=target, outcome="ok",
                        detail=f"sha256 {info.sha256}, {info.length} bytes")  # fmt: skip
    except EdgeOSError as exc:
        audit_refusal(ctx.db, actor=actor, action="publish", target=target, detail=str(exc))
        raise
    return row


def list_artifacts(conn: Connection, kind: str | None = None) -> list[dict[str, Any]]:
    """Every published artifact, by kind, name and publication time."""
    a = tables.artifacts
    query = sa.select(a).order_by(a.c.kind, a.c.name, a.c.published_at)
    if kind is not None:
        query = query.where(a.c.kind == kind)
    return [dict(row) for row in conn.execute(query).mappings()]
