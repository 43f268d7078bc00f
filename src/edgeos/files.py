"""Durable file writes: a power cut leaves the old file or the new one, never half.

Every write goes to a temporary file beside the target, is fsynced, renamed over the
target, and the directory is fsynced (the rename is durable only once the directory
entry is on disk). Keys, certificates, the model store, connector state and service
files all write through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

#: Directories made for a write are private unless the caller says otherwise: most hold
#: keys or node state.
PRIVATE_DIR = 0o700


def write_atomic(
    path: Path, data: bytes, mode: int = 0o600, *, dir_mode: int = PRIVATE_DIR
) -> None:
    """Write a file whole or not at all, with ``mode``; missing directories are made with
    ``dir_mode``. OSError passes through."""
    make_dirs(path.parent, dir_mode)
    # mkstemp creates the file 0600 from the start, so a private key is never readable
    # by others, not even for the moment between creating and renaming it.
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    fsync_dir(path.parent)


def write_new(path: Path, data: bytes, mode: int = 0o600, *, dir_mode: int = PRIVATE_DIR) -> bool:
    """Write a file whole, only if it does not exist yet; False if it did (made by another
    process meanwhile: the caller reads that one). OSError passes through."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.new")
    write_atomic(staged, data, mode, dir_mode=dir_mode)
    try:
        os.link(staged, path)  # atomic, and never over an existing file
    except FileExistsError:
        return False
    finally:
        os.unlink(staged)
    fsync_dir(path.parent)
    return True


def make_dirs(directory: Path, mode: int = PRIVATE_DIR) -> None:
    """Create ``directory`` and its missing parents with ``mode`` (umask notwithstanding)."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=mode)
        except FileExistsError:
            continue  # made by someone else meanwhile: theirs to own
        os.chmod(created, mode)


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a directory; the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
