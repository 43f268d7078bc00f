"""The effect side of ``files`` bindings: each effect becomes one JSON file in a folder.

``operations: {export: {path: /srv/erp-import}}`` writes each effect of
``<binding>.export`` as ``<path>/<key>.json``, the key percent-encoded so that any key is
one safe file name::

    {"idempotency_key": "...", "operation": "export", "payload": {...}}

The file is written under a hidden temporary name (a leading ``.``, which readers of the
folder skip, a files source among them), synced, then linked to its final name, which
fails when that name exists. So a reader never sees half a file, and a key is written at
most once however often it is delivered: a repeat answers ``{"duplicate": true}``. On a
file system without hard links (FAT on an SD card) the file is renamed into place after
checking that the name is free; that check and the rename are not one step, which is
safe because the delivery worker never delivers one key twice at the same time.

A folder that is missing (a share not mounted yet), full or failing is retryable; one the
node may not write to is not. A failure leaves no temporary file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from edgeos.connectors.base import DeliveryError, UnknownOperation
from edgeos.connectors.config import FileDrop, FilesSourceConfig

# Failures that a person must fix (permissions, a file where the folder should be).
_PERMANENT = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}
# link() refused by the file system itself, not by the name being taken.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def file_name(key: str) -> str:
    """The file of effect ``key``: the key percent-encoded (no ``/``, no leading ``.``)."""
    encoded = quote(key, safe="")
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    return f"{encoded}.json"


class FileDropConnector:
    """Writes the effects of one ``files`` binding as files, once per key."""

    #: The file name is the key, and an existing name is never written again.
    idempotency_keys = True

    def __init__(self, name: str, *, operations: Mapping[str, FileDrop]) -> None:
        self.name = name
        self.operations = dict(operations)

    @classmethod
    def from_config(cls, config: FilesSourceConfig) -> FileDropConnector:
        """The connector for a validated binding with operations."""
        return cls(config.name, operations=config.operations)

    async def deliver(
        self, operation: str, payload: dict[str, Any], key: str
    ) -> dict[str, Any] | None:
        """Write the effect's file; ``{"file": name, "duplicate": bool}``."""
        op = self.operations.get(operation)
        if op is None:
            raise UnknownOperation(self.name, operation, list(self.operations))
        try:
            body = orjson.dumps(
                {"idempotency_key": key, "operation": operation, "payload": payload},
                option=orjson.OPT_INDENT_2,
            )
        except TypeError as exc:
            raise DeliveryError(
                self.name, operation, f"payload is not JSON: {exc}", retryable=False
            ) from exc
        # File system calls block (an NFS share may hang): off the event loop.
        return await asyncio.to_thread(self._write, operation, Path(op.path), key, body)

    async def close(self) -> None:
        """Nothing to release: each delivery opens and closes its own file."""

    def _write(self, operation: str, folder: Path, key: str, body: bytes) -> dict[str, Any]:
        name = file_name(key)
        final = folder / name
        temporary = folder / f".{name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, body)  # a regular file takes it whole or raises
                os.fsync(fd)
            finally:
                os.close(fd)
            duplicate = not _publish(temporary, final)
            if not duplicate:
                _sync_folder(folder)
        except OSError as exc:
            raise self._translate(operation, folder, exc) from exc
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink()
        return {"file": name, "duplicate": duplicate}

    def _translate(self, operation: str, folder: Path, exc: OSError) -> DeliveryError:
        what = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        return DeliveryError(
            self.name,
            operation,
            f"cannot write into {folder}: {what} ({exc.strerror or exc})",
            retryable=exc.errno not in _PERMANENT,
        )


def _publish(temporary: Path, final: Path) -> bool:
    """Give the written file its name unless taken; False when it was (a duplicate)."""
    try:
        os.link(temporary, final)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    # No hard links on this file system: rename into place if the name is free.
    if final.exists():
        return False
    os.replace(temporary, final)
    return True


def _sync_folder(folder: Path) -> None:
    """Make the new name durable (POSIX); a platform that cannot open folders skips it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
