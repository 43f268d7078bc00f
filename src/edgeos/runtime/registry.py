"""The model registry: versioned, content-addressed ONNX models with manifests.

Files live once per content hash under ``<store>/sha256/<hex>.onnx``, so versions that
share bytes share a file. Rows in the node database say which versions exist and which
one is the default. Every change is one transaction: a refused model leaves the registry
exactly as it was.

A kill or power cut in the middle of a change can leave a file no row refers to (a blob
written before its row committed, or one whose row was removed before the file was): the
rows stay right, and :meth:`ModelRegistry.sweep` deletes such leftovers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.errors import ConflictError, InvalidModelError, ManifestError, ModelNotFoundError
from edgeos.files import fsync_dir
from edgeos.runtime.onnx_file import OnnxSignature, inspect_onnx
from edgeos.runtime.sessions import HostConfig, create_session
from edgeos.state import Database

if TYPE_CHECKING:
    from edgeos.manifests import ModelManifest, ModelSpec, TensorSpec

# The manifest models are imported by the functions that use them, not here: they need
# pydantic, and a node with no model registered must not import it.


# Files of the store: a blob, or a blob being written by a process (``.tmp-<pid>``).
_STORE_FILE = re.compile(r"([0-9a-f]{64})(?:\.onnx|\.tmp-([0-9]+))")
# Directories of generative models: a model, or one being copied in (``.tmp-<pid>-...``).
_GENAI_DIR = re.compile(r"([0-9a-f]{64})|\.tmp-([0-9]+)-[^/]*")

# Store files younger than this are never swept: they may belong to an add under way.
SWEEP_GRACE = 600.0


class ModelRegistry:
    """Models registered on this node."""

    def __init__(self, db: Database, store: Path) -> None:
        self.db = db
        self.store = store

    # -- queries ----------------------------------------------------------------------
    def catalog(self) -> list[tuple[ModelManifest, bool]]:
        """Every registered version with its default flag, by name then age."""
        rows = self.db.reader().execute(
            "SELECT manifest, is_default FROM model_versions ORDER BY name, created_at"
        )
        return [(_manifest(raw), bool(default)) for raw, default in rows]

    def versions(self, name: str) -> list[ModelManifest]:
        """Every version of one model, oldest first; raises if the model is unknown."""
        rows = (
            self.db.reader()
            .execute(
                "SELECT manifest FROM model_versions WHERE name = ? ORDER BY created_at", (name,)
            )
            .fetchall()
        )
        if not rows:
            raise ModelNotFoundError(f"no model named '{name}' is registered")
        return [_manifest(raw) for (raw,) in rows]

    def get(self, name: str, version: str | None = None) -> ModelManifest:
        """One version of a model; the default version when ``version`` is None."""
        conn = self.db.reader()
        if version is None:
            row = conn.execute(
                "SELECT manifest FROM model_versions WHERE name = ? AND is_default = 1", (name,)
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT manifest FROM model_versions WHERE name = ? AND version = ?",
                (name, version),
            ).fetchone()
        if row is None:
            if version is None:
                raise ModelNotFoundError(f"no model named '{name}' is registered")
            self.versions(name)  # raises for an unknown model: the clearer message
            raise ModelNotFoundError(f"model '{name}' has no version '{version}'")
        return _manifest(row[0])

    def default_version(self, name: str) -> str:
        """The version served when a caller names no version."""
        return self.get(name).version

    def path(self, manifest: ModelManifest) -> Path:
        """Where the model's bytes are stored (a directory for a generative model)."""
        if manifest.kind == "generative":
            return self.store / "genai" / manifest.sha256
        return self.store / "sha256" / f"{manifest.sha256}.onnx"

    def profile(self, name: str, version: str) -> dict[str, Any] | None:
        """The stored profile of a model version, if it was profiled."""
        row = (
            self.db.reader()
            .execute(
                "SELECT profile FROM model_profiles WHERE name = ? AND version = ?", (name, version)
            )
            .fetchone()
        )
        return None if row is None else dict(orjson.loads(row[0]))

    # -- changes ----------------------------------------------------------------------
    def add(
        self,
        file: Path,
        *,
        name: str | None = None,
        version: str | None = None,
        manifest: Path | ModelSpec | None = None,
        make_default: bool | None = None,
        quantization: str | None = None,
        derived_from: str | None = None,
    ) -> ModelManifest:
        """Validate and register a model file as a new version.

        The first version of a model becomes its default; later ones only with
        ``make_default=True``. Raises InvalidModelError, ManifestError or ConflictError and
        changes nothing when the file or manifest is refused.
        """
        from edgeos.manifests import ModelSpec, load_manifest, validate_model_name, validate_version

        spec = load_manifest(manifest, ModelSpec) if isinstance(manifest, Path) else manifest
        spec = spec or ModelSpec()
        source = str(manifest) if isinstance(manifest, Path) else "manifest"
        if spec.kind == "generative":
            raise ManifestError(
                source, ["field 'kind': a generative model is a directory (see docs/genai.md)"]
            )
        name = validate_model_name(_agree(source, "name", name, spec.name) or _name_of(file))
        version = _agree(source, "version", version, spec.version)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise InvalidModelError(f"cannot read model file {file}: {exc.strerror}") from exc
        signature = inspect_onnx(data, str(file))
        _check_declared(source, "inputs", spec.inputs, signature.inputs)
        _check_declared(source, "outputs", spec.outputs, signature.outputs)
        _check_loadable(data, str(file))
        digest = hashlib.sha256(data).hexdigest()
        blob = self.store / "sha256" / f"{digest}.onnx"
        self.sweep()  # room first: what interrupted changes left behind long ago
        wrote_blob = _store_blob(blob, data)
        try:
            with self.db.transaction() as conn:
                # Under the write lock, as sweep and remove delete files: a blob that was
                # there a moment ago but referenced by no row may have been deleted since.
                if not blob.exists():
                    wrote_blob = _store_blob(blob, data)
                version = validate_version(version or next_version(conn, name))
                record = _record(spec, name, version, signature, len(data), digest)
                record = record.model_copy(
                    update={"quantization": quantization, "derived_from": derived_from}
                )
                insert_version(conn, record, make_default)
        except BaseException:
            if wrote_blob:
                blob.unlink(missing_ok=True)
            raise
        return record

    def set_default(self, name: str, version: str) -> None:
        """Make ``version`` the one served when callers name no version."""
        with self.db.transaction() as conn:
            self.get(name, version)
            conn.execute("UPDATE model_versions SET is_default = 0 WHERE name = ?", (name,))
            conn.execute(
                "UPDATE model_versions SET is_default = 1 WHERE name = ? AND version = ?",
                (name, version),
            )

    def remove(self, name: str, version: str | None = None) -> list[ModelManifest]:
        """Remove one version (or every version when ``version`` is None).

        Removing the default version while others remain makes the newest one the default.
        """
        with self.db.transaction() as conn:
            doomed = [self.get(name, version)] if version else self.versions(name)
            for record in doomed:
                conn.execute(
                    "DELETE FROM model_versions WHERE name = ? AND version = ?",
                    (name, record.version),
                )
            if version is not None:
                conn.execute(
                    "UPDATE model_versions SET is_default = 1 WHERE rowid = ("
                    " SELECT rowid FROM model_versions WHERE name = ? ORDER BY created_at DESC"
                    " LIMIT 1) AND NOT EXISTS ("
                    " SELECT 1 FROM model_versions WHERE name = ? AND is_default = 1)",
                    (name, name),
                )
            unreferenced = [
                r
                for r in doomed
                if conn.execute(
                    "SELECT 1 FROM model_versions WHERE sha256 = ?", (r.sha256,)
                ).fetchone()
                is None
            ]
        if unreferenced:
            # Deleted under the write lock, and only if still unreferenced: an add in another
            # process may have committed a version with the same bytes since.
            with self.db.transaction() as conn:
                for record in unreferenced:
                    if not _referenced(conn, record.sha256):
                        if record.kind == "generative":
                            shutil.rmtree(self.path(record), ignore_errors=True)
                        else:
                            self.path(record).unlink(missing_ok=True)
        return doomed

    def sweep(self, *, grace: float = SWEEP_GRACE) -> list[Path]:
        """Delete store files no version refers to; returns them.

        Such files are what a kill or power cut in the middle of ``add`` or ``remove``
        leaves: a blob whose row never committed, a blob whose row was removed, a
        temporary file of a writer that died. Files younger than ``grace`` seconds are
        kept (an add in another process writes its blob before its row), and so are the
        temporary files of processes still running.
        """
        swept = []
        now = time.time()
        # Under the write lock: no add can commit a reference to a file while it goes.
        with self.db.transaction() as conn:
            # Blobs, and the directories of generative models (see genai_store).
            kinds = ((self.store / "sha256", _STORE_FILE), (self.store / "genai", _GENAI_DIR))
            for path, match in (
                (path, pattern.fullmatch(path.name))
                for folder, pattern in kinds
                if folder.is_dir()
                for path in folder.iterdir()
            ):
                if match is None:
                    continue  # not ours: leave it alone
                digest, pid = match.group(1), match.group(2)
                try:
                    young = now - path.stat().st_mtime < grace
                except FileNotFoundError:
                    continue
                if young or (pid is not None and _running(int(pid))):
                    continue
                if pid is None and _referenced(conn, digest):
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                swept.append(path)
        return swept

    def save_profile(self, name: str, version: str, profile: dict[str, Any]) -> None:
        """Store (or replace) the profile of a model version."""
        with self.db.transaction() as conn:
            self.get(name, version)
            conn.execute(
                "INSERT INTO model_profiles (name, version, created_at, profile) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (name, version) DO UPDATE SET "
                "created_at = excluded.created_at, profile = excluded.profile",
                (name, version, time.time(), orjson.dumps(profile)),
            )


def insert_version(
    conn: sqlite3.Connection, record: ModelManifest, make_default: bool | None
) -> None:
    """Add the row of a new version inside a write transaction (see :meth:`ModelRegistry.add`
    for ``make_default``); ConflictError if the version exists."""
    name, version = record.name, record.version
    has_default = conn.execute(
        "SELECT 1 FROM model_versions WHERE name = ? AND is_default = 1", (name,)
    ).fetchone()
    default = make_default or (make_default is None and not has_default)
    if default:
        conn.execute("UPDATE model_versions SET is_default = 0 WHERE name = ?", (name,))
    try:
        conn.execute(
            "INSERT INTO model_versions "
            "(name, version, sha256, manifest, created_at, is_default) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (name, version, record.sha256, record.model_dump_json(), time.time(), default),
        )
    except sqlite3.IntegrityError as exc:
        raise ConflictError(
            f"model '{name}' already has a version '{version}'; choose another "
            "--version or remove it first"
        ) from exc


def _manifest(raw: str) -> ModelManifest:
    from edgeos.manifests.model import ModelManifest

    return ModelManifest.model_validate_json(raw)


def _name_of(file: Path) -> str:
    return file.stem.lower()


def _agree(source: str, field: str, flag: str | None, declared: str | None) -> str | None:
    if flag and declared and flag != declared:
        raise ManifestError(
            source, [f"field '{field}': says {declared!r} but the command line says {flag!r}"]
        )
    return flag or declared


def _check_declared(
    source: str, field: str, declared: list[TensorSpec] | None, actual: list[TensorSpec]
) -> None:
    if declared is None:
        return
    problems = []
    by_name = {t.name: t for t in actual}
    for index, want in enumerate(declared):
        got = by_name.get(want.name)
        where = f"field '{field}.{index}'"
        if got is None:
            problems.append(
                f"{where}: the model has no {field[:-1]} named '{want.name}' "
                f"(it has {', '.join(by_name) or 'none'})"
            )
        elif got.datatype != want.datatype:
            problems.append(f"{where}: datatype {want.datatype} but the model says {got.datatype}")
        elif len(got.shape) != len(want.shape) or any(
            g >= 0 and w >= 0 and g != w for g, w in zip(got.shape, want.shape, strict=False)
        ):
            problems.append(f"{where}: shape {want.shape} but the model says {got.shape}")
    if problems:
        raise ManifestError(source, problems)


def _check_loadable(data: bytes, source: str) -> None:
    """The checker passes files ONNX Runtime cannot run (unknown ops); catch them now."""
    create_session(data, HostConfig(), what=source)


def _record(
    spec: ModelSpec, name: str, version: str, sig: OnnxSignature, size: int, digest: str
) -> ModelManifest:
    from edgeos.manifests.model import ModelManifest

    fields = spec.model_dump(exclude={"name", "version", "inputs", "outputs"})
    return ModelManifest(
        **fields,
        name=name,
        version=version,
        inputs=sig.inputs,
        outputs=sig.outputs,
        opset=sig.opset,
        size_bytes=size,
        sha256=digest,
    )


def _referenced(conn: sqlite3.Connection, digest: str) -> bool:
    row = conn.execute("SELECT 1 FROM model_versions WHERE sha256 = ? LIMIT 1", (digest,))
    return row.fetchone() is not None


def _running(pid: int) -> bool:
    """Whether a process with this id exists (it may be another one by now: then a
    leftover waits for a later sweep)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def next_version(conn: sqlite3.Connection, name: str) -> str:
    """The version label a new version gets when its author names none."""
    numbers = [
        int(v)
        for (v,) in conn.execute("SELECT version FROM model_versions WHERE name = ?", (name,))
        if v.isdigit()
    ]
    return str(max(numbers, default=0) + 1)


def _store_blob(path: Path, data: bytes) -> bool:
    """Write content-addressed bytes durably; False if an identical file was there.

    Not :func:`edgeos.files.write_new`: the temporary file is named with the writer's pid
    (``<digest>.tmp-<pid>``), which is how :meth:`ModelRegistry.sweep` tells a live
    writer's file from a dead one's.
    """
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        # The rename is durable only once the directory is synced; the row that will
        # refer to the file is (synchronous=FULL), so without this a power cut could
        # keep the row and lose the file.
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return True
