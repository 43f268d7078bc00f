"""Unpacking an artifact archive (tar.gz of a directory) into a staging directory.

The bytes were verified by TUF, but every entry is still checked: regular files and
directories only, no path that leaves the directory, a bounded unpacked size. The
fleet packs paths relative to the directory; an archive whose files all sit under one
top-level directory is accepted too.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from edgeos.errors import VerificationError

#: Unpacked size refused beyond this (a model plus its manifest, an agent bundle).
MAX_UNPACKED_BYTES = 4 * 1024 * 1024 * 1024


def unpack(data: bytes, target: Path, source: str, *, max_bytes: int = MAX_UNPACKED_BYTES) -> Path:
    """Unpack ``data`` into ``target`` (replaced if present); returns the content's root.

    VerificationError names ``source`` and the entry that is refused.
    """
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar:
                if member.isdir() and member.name.strip("./") == "":
                    continue  # the archive's own root, as `tar -C DIR .` writes it
                parts = _parts(member.name, source)
                if member.isdir():
                    target.joinpath(*parts).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise VerificationError(
                        f"{source}: entry {member.name!r} is not a regular file or directory"
                    )
                total += member.size
                if total > max_bytes:
                    raise VerificationError(f"{source}: unpacks to more than {max_bytes} bytes")
                path = target.joinpath(*parts)
                if path.exists():
                    raise VerificationError(f"{source}: entry {member.name!r} appears twice")
                handle = tar.extractfile(member)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(handle.read() if handle is not None else b"")
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
        raise VerificationError(f"{source}: not a readable tar.gz archive ({exc})") from exc
    entries = list(target.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return target


def _parts(name: str, source: str) -> list[str]:
    path = PurePosixPath(name)
    parts = [p for p in path.parts if p != "."]
    if path.is_absolute() or ".." in parts or not parts or "\\" in name:
        raise VerificationError(f"{source}: entry {name!r} leaves the archive")
    return parts
