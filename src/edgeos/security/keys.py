"""Private keys and the files that hold keys and certificates.

Every file is written atomically (:mod:`edgeos.files`) so a power cut leaves either the
old file or the new one, never half a key. Private keys are 0600; directories this module
creates are 0700 because they hold private keys next to the certificates.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeos.errors import ConfigError
from edgeos.files import write_atomic

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


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
