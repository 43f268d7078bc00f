"""Private keys and the files that hold keys and certificates.

Every file is written atomically (a temporary file beside the target, fsynced, then
renamed over it, then the directory fsynced) so a power cut leaves either the old file or
the new one, never half a key. Private keys are 0600; directories this module creates
are 0700 because they hold private keys next to the certificates.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeos.errors import ConfigError

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (the file's protection is its mode)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` to ``path`` as PKCS#8 PEM, atomically, readable by the owner only."""
    _write_atomic(Path(path), private_key_pem(key), PRIVATE_MODE)


def write_public_file(path: Path, data: bytes | str) -> None:
    """Write a certificate (or other public data) to ``path`` atomically, mode 0644."""
    _write_atomic(Path(path), data.encode() if isinstance(data, str) else data, PUBLIC_MODE)


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The EC private key in the PEM file ``path``; ConfigError naming the file otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the private key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: the key is encrypted; ValueError: not a PEM key at all.
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an EC private key")
    return key


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file whole or not at all: a temporary file with ``mode``, fsync, rename,
    directory fsync. Missing directories are made 0700; OSError passes through."""
    _make_dirs(path.parent)
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
    _fsync_dir(path.parent)


def write_new(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Write a file whole, only if it does not exist yet; False if it did (made by another
    process meanwhile: the caller reads that one). OSError passes through."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.new")
    write_atomic(staged, data, mode)
    try:
        os.link(staged, path)  # atomic, and never over an existing file
    except FileExistsError:
        return False
    finally:
        os.unlink(staged)
    _fsync_dir(path.parent)
    return True


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents 0700 (umask notwithstanding)."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # made by someone else meanwhile: theirs to own
        os.chmod(created, DIR_MODE)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
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
