"""The credential vault: secrets encrypted at rest, handed only to the scopes allowed.

Each secret is sealed with AES-256-GCM under the node's vault key; the associated data
binds a ciphertext to its name and version, so rows cannot be swapped or rolled back
unnoticed.

The vault key lives in ``<data dir>/keys/vault.key`` (mode 0600), made at first use. Once
the node has a device identity (``fleet/device.key``), the file holds the vault key only
wrapped (AES-GCM) under a key derived from the device's private key (HKDF), so a copy of
the database and ``keys/`` on another machine is useless without the device key. A node
without an identity keeps the key in the clear until it has one; the next
:func:`load_key` then wraps it (this is also how vaults made before binding move over).

Secrets come from two places: ``edgeos secrets set`` on the node, and grants the fleet
sends down sealed to the device (``grant_id`` set; see :mod:`edgeos.sync.grants`). A
granted secret is the fleet's to change: the node's commands refuse to.

Values never leave through ``entries``; ``Redactor`` removes every current value from text
(logs, errors, journal payloads) before it is written anywhere.

Each secret is stored with the scopes allowed to read it (``edgeos secrets set NAME
--scope supplier.write``). A connector never sees the vault itself, only a
:class:`BindingSecrets`: the secrets granted to one of its binding's scopes, which are the
binding's own name and the ``scopes`` it lists in ``connectors.yaml``.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from edgeos.connectors.personal import overwritten
from edgeos.errors import ConfigError, EdgeOSError, NotFoundError
from edgeos.state import Database

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Scopes name permissions ("supplier.write", "orders:write") and bindings ("supplier").
_SCOPE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,63}$")
SCOPE_RULE = "use 1-64 of A-Z a-z 0-9 _ . : - starting with a letter, digit or _"
KEY_BYTES = 32


class SecretError(EdgeOSError):
    """A secret is missing, expired, or not granted to the scope asking for it."""

    http_status = 403


class SecretNotGranted(SecretError):
    """The secret exists, but not for the scope (or binding) asking for it."""


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes, sorted and without repeats; ValueError naming the first bad one."""
    out = sorted(set(scopes))
    for scope in out:
        if not isinstance(scope, str) or not _SCOPE.match(scope):
            raise ValueError(f"scope {scope!r}: {SCOPE_RULE}")
    return out


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown about a secret: everything but its value."""

    name: str
    version: int
    scopes: list[str]
    expires_at: float | None
    updated_at: float
    #: The fleet grant it came from; None for a secret set on the node.
    grant_id: str | None = None


#: A wrapped vault key file starts with this line; a bare 32-byte file is an unwrapped key.
_WRAPPED = b"edgeos vault key, wrapped by the device key, v1\n"
_WRAP_PURPOSE = b"vault key wrap"
# Where the node keeps its device identity key (edgeos.sync.identity.FleetPaths.key).
_DEVICE_KEY = Path("fleet") / "device.key"


def load_key(data_dir: Path) -> bytes:
    """The node's vault key, made on first use; bound to the device identity once there is one.

    ConfigError naming the files when the key file is damaged, when it is bound and the
    device key is missing, or when the device key is not the one it was bound to.
    """
    path = data_dir / "keys" / "vault.key"
    device_key_path = data_dir / _DEVICE_KEY
    stored = path.read_bytes() if path.exists() else None
    device = device_key_path.exists()
    if stored is not None and stored.startswith(_WRAPPED):
        if not device:
            raise ConfigError(
                f"{path} is bound to the device identity and {device_key_path} is missing: "
                "restore the device key; without it the vault cannot be read"
            )
        return _unwrap(path, stored, _wrapping(device_key_path))
    if stored is not None and len(stored) != KEY_BYTES:
        raise ConfigError(f"{path} is not a vault key ({len(stored)} bytes, expected {KEY_BYTES})")
    if stored is None:
        key = os.urandom(KEY_BYTES)
        if not _write_key(
            path, _wrap(key, _wrapping(device_key_path)) if device else key, new=True
        ):
            return load_key(data_dir)  # another process (the node, the CLI) made it first
        return key
    if device:
        # First sight of an identity (or a vault from before binding): wrap the key in place.
        _write_key(path, _wrap(stored, _wrapping(device_key_path)))
    return stored


def _wrapping(device_key_path: Path) -> bytes:
    """The key that wraps the vault key: derived from the device's private key."""
    from edgeos.security.keys import load_private_key
    from edgeos.security.sealing import derived_key

    return derived_key(load_private_key(device_key_path), _WRAP_PURPOSE)


def _wrap(key: bytes, wrapping: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return _WRAPPED + nonce + AESGCM(wrapping).encrypt(nonce, key, _WRAPPED)


def _unwrap(path: Path, stored: bytes, wrapping: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    body = stored[len(_WRAPPED) :]
    try:
        key = AESGCM(wrapping).decrypt(body[:12], body[12:], _WRAPPED)
    except (InvalidTag, ValueError) as exc:
        raise ConfigError(
            f"{path} was bound to another device identity than {path.parent.parent / _DEVICE_KEY}"
            " (a copied data directory, or a replaced device key): the vault cannot be read"
        ) from exc
    return bytes(key)


def _write_key(path: Path, data: bytes, *, new: bool = False) -> bool:
    """Write the key file (0600); with ``new``, only if there is none (False if there was)."""
    from edgeos.files import write_atomic, write_new

    try:
        if new:
            return write_new(path, data)
        write_atomic(path, data, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write the vault key {path}: {exc.strerror or exc}") from exc
    return True


class Vault:
    """Secrets of one node."""

    def __init__(self, db: Database, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.db = db
        self._aead = AESGCM(key)

    def set(
        self,
        name: str,
        value: str,
        *,
        scopes: Iterable[str] = (),
        expires_at: float | None = None,
    ) -> SecretInfo:
        """Store a secret (a new version if it exists); ConfigError for bad input and for a
        secret the fleet granted (the fleet changes it)."""
        scope_list = _checked(name, value, scopes)
        # The old version's row is overwritten on disk as it is replaced (see drop_grants).
        with self.db.transaction() as conn, overwritten(conn):
            row = conn.execute(
                "SELECT version, grant_id FROM secrets WHERE name = ?", (name,)
            ).fetchone()
            if row is not None and row[1] is not None:
                raise ConfigError(_fleet_owned(name, row[1]))
            version = 1 if row is None else int(row[0]) + 1
            return self._store(conn, name, value, scope_list, expires_at, version, None)

    def grant(
        self,
        name: str,
        value: str,
        *,
        scopes: Iterable[str],
        expires_at: float,
        version: int,
        grant_id: str,
    ) -> SecretInfo:
        """Store a secret the fleet granted, replacing whatever held its name."""
        scope_list = _checked(name, value, scopes)
        with self.db.transaction() as conn, overwritten(conn):
            return self._store(conn, name, value, scope_list, expires_at, version, grant_id)

    def grants(self) -> dict[str, int]:
        """The fleet grants held: grant id to version."""
        rows = self.db.reader().execute(
            "SELECT grant_id, version FROM secrets WHERE grant_id IS NOT NULL"
        )
        return {str(g): int(v) for g, v in rows}

    def drop_grants(self, keep: Iterable[str]) -> list[str]:
        """Forget every fleet-granted secret whose grant is not in ``keep`` (revoked,
        expired or replaced at the fleet); the names forgotten."""
        kept = set(keep)
        # Overwritten on disk, not only unlinked: a revoked secret must not be recoverable
        # from the file's free pages by whoever gets the device later.
        with self.db.transaction() as conn, overwritten(conn):
            rows = conn.execute(
                "SELECT name, grant_id FROM secrets WHERE grant_id IS NOT NULL"
            ).fetchall()
            gone = [name for name, grant_id in rows if grant_id not in kept]
            conn.executemany("DELETE FROM secrets WHERE name = ?", [(n,) for n in gone])
        return gone

    def _store(
        self,
        conn: sqlite3.Connection,
        name: str,
        value: str,
        scopes: list[str],
        expires_at: float | None,
        version: int,
        grant_id: str | None,
    ) -> SecretInfo:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, value.encode(), _aad(name, version))
        now = time.time()
        conn.execute(
            "INSERT INTO secrets (name, version, nonce, ciphertext, scopes, expires_at, "
            "updated_at, grant_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE "
            "SET version = excluded.version, nonce = excluded.nonce, "
            "ciphertext = excluded.ciphertext, scopes = excluded.scopes, "
            "expires_at = excluded.expires_at, updated_at = excluded.updated_at, "
            "grant_id = excluded.grant_id",
            (name, version, nonce, sealed, orjson.dumps(scopes).decode(), expires_at, now,
             grant_id),
        )  # fmt: skip
        return SecretInfo(name, version, scopes, expires_at, now, grant_id)

    def rotate(self, name: str, value: str) -> SecretInfo:
        """A new value for an existing secret, keeping its scopes and expiry."""
        info = self.info(name)
        return self.set(name, value, scopes=info.scopes, expires_at=info.expires_at)

    def remove(self, name: str) -> None:
        """Forget a secret (not one the fleet granted: revoking the grant removes it)."""
        with self.db.transaction() as conn, overwritten(conn):
            row = conn.execute("SELECT grant_id FROM secrets WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFoundError(f"no secret named '{name}'")
            if row[0] is not None:
                raise ConfigError(_fleet_owned(name, row[0]))
            conn.execute("DELETE FROM secrets WHERE name = ?", (name,))

    def info(self, name: str) -> SecretInfo:
        """Everything about a secret but its value."""
        row = (
            self.db.reader()
            .execute(f"SELECT {_INFO} FROM secrets WHERE name = ?", (name,))
            .fetchone()
        )
        if row is None:
            raise NotFoundError(f"no secret named '{name}'")
        return _info(row)

    def entries(self) -> list[SecretInfo]:
        """Every secret, without values."""
        rows = self.db.reader().execute(f"SELECT {_INFO} FROM secrets ORDER BY name")
        return [_info(r) for r in rows]

    def get(self, name: str, *, scope: str, now: float | None = None) -> str:
        """The value, for a holder of ``scope``; SecretError if not granted or expired."""
        row = (
            self.db.reader()
            .execute(
                "SELECT version, nonce, ciphertext, scopes, expires_at, grant_id FROM secrets "
                "WHERE name = ?",
                (name,),
            )
            .fetchone()
        )
        if row is None:
            raise SecretError(f"secret '{name}' is not in this node's vault (edgeos secrets set)")
        version, nonce, sealed, scopes, expires_at, grant_id = row
        if scope not in orjson.loads(scopes):
            raise SecretNotGranted(f"secret '{name}' is not granted to scope '{scope}'")
        if expires_at is not None and expires_at <= (time.time() if now is None else now):
            when = datetime.fromtimestamp(expires_at, UTC).isoformat(timespec="seconds")
            remedy = (
                f"ask the fleet for a new grant (grant {grant_id})"
                if grant_id
                else "rotate it (edgeos secrets set)"
            )
            raise SecretError(f"secret '{name}' expired at {when}; {remedy}")
        from cryptography.exceptions import InvalidTag

        try:
            return str(self._aead.decrypt(nonce, sealed, _aad(name, version)).decode())
        except InvalidTag as exc:
            raise SecretError(
                f"secret '{name}' does not decrypt: the vault key or the row was changed"
            ) from exc

    def values(self) -> list[str]:
        """Every current value (for the redactor only)."""
        rows = self.db.reader().execute("SELECT name, version, nonce, ciphertext FROM secrets")
        out = []
        for name, version, nonce, sealed in rows:
            try:
                out.append(self._aead.decrypt(nonce, sealed, _aad(name, version)).decode())
            except Exception:  # an undecryptable row has no value to hide
                continue
        return out


_INFO = "name, version, scopes, expires_at, updated_at, grant_id"


def _info(row: Sequence[Any]) -> SecretInfo:
    return SecretInfo(row[0], row[1], orjson.loads(row[2]), row[3], row[4], row[5])


def _checked(name: str, value: str, scopes: Iterable[str]) -> list[str]:
    """The scopes of a secret about to be stored; ConfigError for a bad name, value or scope."""
    if not _NAME.match(name):
        raise ConfigError(f"secret name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    if not value:
        raise ConfigError(f"secret {name!r}: the value is empty")
    try:
        scope_list = check_scopes(scopes)
    except ValueError as exc:
        raise ConfigError(f"secret {name!r}: {exc}") from None
    if not scope_list:
        raise ConfigError(f"secret {name!r}: give at least one scope allowed to read it")
    return scope_list


def _fleet_owned(name: str, grant_id: str) -> str:
    return (
        f"secret '{name}' was granted by the fleet (grant {grant_id}): change or revoke it "
        "there (edgeos fleet secrets ...)"
    )


class BindingSecrets:
    """The vault as one binding sees it: ``secrets(name)`` is the value of a secret granted
    to one of the binding's scopes, and SecretError for any other.

    ``lookup(name, scope)`` is the node's vault (:meth:`Vault.get`); the binding's scopes
    are asked in order until one is granted.
    """

    def __init__(
        self, lookup: Callable[[str, str], str], binding: str, scopes: Sequence[str]
    ) -> None:
        self.binding = binding
        self.scopes = tuple(dict.fromkeys(scopes))
        self._lookup = lookup

    def __call__(self, name: str) -> str:
        for scope in self.scopes:
            try:
                return self._lookup(name, scope)
            except SecretNotGranted:
                continue
        raise SecretNotGranted(
            f"secret '{name}' is not granted to binding '{self.binding}' (its scopes: "
            f"{', '.join(self.scopes)}); grant it with edgeos secrets set {name} --scope ..."
        )


def _aad(name: str, version: int) -> bytes:
    return f"edgeos-secret:{name}:{version}".encode()


class Redactor:
    """Replaces every value of at least 4 characters (secrets, personal values) in text with
    ``mask``; shorter ones would mask ordinary words and numbers too."""

    def __init__(self, values: Iterable[str], mask: str = "***") -> None:
        found = sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in found)) if found else None
        self.mask = mask

    def __call__(self, text: str) -> str:
        # A function, not a template: a mask is inserted as it is, backslashes and all.
        return text if self._pattern is None else self._pattern.sub(lambda _: self.mask, text)
