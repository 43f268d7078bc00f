"""The keys of the fleet's TUF repository: made once, kept as PEM files, loaded to sign.

Root is signed by offline root keys (a threshold of them), written to a directory meant to
leave the server; targets, snapshot and timestamp by one online key each, kept with the
server under ``keys/tuf/``. Key files are EC P-256, written 0600 and never overwritten.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer

from edgeos.errors import ConfigError, ConflictError

ONLINE_ROLES: tuple[str, ...] = ("targets", "snapshot", "timestamp")
"""The roles signed by keys kept with the server."""


@dataclass(frozen=True)
class OnlineSigners:
    """The online keys: one signer for each of targets, snapshot and timestamp."""

    targets: Signer
    snapshot: Signer
    timestamp: Signer

    def for_role(self, role: str) -> Signer:
        """The signer of ``role`` (one of :data:`ONLINE_ROLES`)."""
        if role not in ONLINE_ROLES:
            raise ValueError(f"{role!r} is not an online TUF role")
        signer: Signer = getattr(self, role)
        return signer


@dataclass(frozen=True)
class TufKeys:
    """Keys made by :func:`create_keys`: the root signers, their threshold, the online keys."""

    root: tuple[Signer, ...]
    threshold: int
    online: OnlineSigners


def _online_key_path(keys_dir: Path, role: str) -> Path:
    return keys_dir / "tuf" / f"{role}.key"


def _root_key_path(root_keys_dir: Path, index: int) -> Path:
    return root_keys_dir / f"root-{index}.key"


def check_threshold(keys: int, threshold: int) -> None:
    """ConfigError unless ``threshold`` root signatures can be had from ``keys`` keys."""
    if not 1 <= threshold <= keys:
        raise ConfigError(
            f"a TUF root threshold of {threshold} needs between 1 and {keys} keys "
            f"(there are {keys} root keys)"
        )


def create_keys(
    keys_dir: Path, root_keys_dir: Path, *, root_keys: int = 1, threshold: int = 1
) -> TufKeys:
    """Make the TUF keys: EC P-256 PEM files, written 0600, never over existing ones.

    Online keys go to ``keys_dir/tuf/{targets,snapshot,timestamp}.key``, root keys to
    ``root_keys_dir/root-N.key`` (N from 1); the root keys are meant to leave the server.
    """
    if root_keys < 1:
        raise ConfigError(f"a TUF root needs at least one key, not {root_keys}")
    check_threshold(root_keys, threshold)
    online_paths = {role: _online_key_path(keys_dir, role) for role in ONLINE_ROLES}
    root_paths = [_root_key_path(root_keys_dir, i) for i in range(1, root_keys + 1)]
    existing = [p for p in [*online_paths.values(), *root_paths] if p.exists()]
    if root_keys_dir.is_dir():
        # A leftover root key from an earlier set would be mistaken for one of the new set.
        existing += sorted(p for p in root_keys_dir.glob("root-*.key") if p not in existing)
    if existing:
        names = ", ".join(str(p) for p in existing)
        raise ConflictError(f"TUF keys exist already, refusing to overwrite them: {names}")

    online = {role: CryptoSigner.generate_ecdsa() for role in ONLINE_ROLES}
    root = [CryptoSigner.generate_ecdsa() for _ in root_paths]
    for role, path in online_paths.items():
        _write_key(path, online[role])
    for signer, path in zip(root, root_paths, strict=True):
        _write_key(path, signer)
    return TufKeys(
        root=tuple(root),
        threshold=threshold,
        online=OnlineSigners(online["targets"], online["snapshot"], online["timestamp"]),
    )


def load_online_keys(keys_dir: Path) -> OnlineSigners:
    """The online signers from ``keys_dir/tuf``; a missing or unreadable key is a ConfigError."""
    loaded = {role: _read_key(_online_key_path(keys_dir, role)) for role in ONLINE_ROLES}
    return OnlineSigners(loaded["targets"], loaded["snapshot"], loaded["timestamp"])


def load_root_keys(root_keys_dir: Path) -> list[Signer]:
    """Every ``root-N.key`` in ``root_keys_dir``, in the order of N."""

    def index(path: Path) -> int:
        return int(path.stem.removeprefix("root-"))

    paths = [p for p in root_keys_dir.glob("root-*.key") if p.stem[5:].isdigit()]
    if not paths:
        raise ConfigError(f"no TUF root keys (root-N.key) in {root_keys_dir}")
    return [_read_key(p) for p in sorted(paths, key=index)]


def _write_key(path: Path, signer: CryptoSigner) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # O_EXCL: a key that appeared since the check above is still not overwritten.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(signer.private_bytes)


def _read_key(path: Path) -> CryptoSigner:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"TUF key {path} is missing") from None
    except OSError as exc:
        raise ConfigError(f"TUF key {path} cannot be read: {exc}") from exc
    try:
        return CryptoSigner(load_pem_private_key(pem, password=None))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"TUF key {path} is not a usable private key: {exc}") from exc
