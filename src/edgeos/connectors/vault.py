"""The credential vault: secrets encrypted at rest, handed only to the scopes allowed.

Each secret is sealed with AES-256-GCM under the node's vault key; the associated data
binds a ciphertext to its name and version, so rows cannot be swapped or rolled back
unnoticed. The key lives in ``<data dir>/keys/vault.key`` (mode 0600), made at first use.
When the node has a fleet identity, the key is to be derived from the device's private key
(HKDF), so a copied database is useless on another machine.

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
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

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


def load_key(data_dir: Path) -> bytes:
    """The node's vault key, created (0600, in a 0700 folder) on first use."""
    folder = data_dir / "keys"
    path = folder / "vault.key"
    if path.exists():
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise ConfigError(f"{path} is not a vault key ({len(key)} bytes, expected {KEY_BYTES})")
        return key
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = os.urandom(KEY_BYTES)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return key


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
        """Store a secret (a new version if it exists)."""
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
        with self.db.transaction() as conn:
            row = conn.execute("SELECT version FROM secrets WHERE name = ?", (name,)).fetchone()
            version = 1 if row is None else int(row[0]) + 1
            nonce = os.urandom(12)
            sealed = self._aead.encrypt(nonce, value.encode(), _aad(name, version))
            now = time.time()
            conn.execute(
                "INSERT INTO secrets (name, version, nonce, ciphertext, scopes, expires_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "version = excluded.version, nonce = excluded.nonce, "
                "ciphertext = excluded.ciphertext, scopes = excluded.scopes, "
                "expires_at = excluded.expires_at, updated_at = excluded.updated_at",
                (name, version, nonce, sealed, orjson.dumps(scope_list).decode(), expires_at, now),
            )
        return SecretInfo(name, version, scope_list, expires_at, now)

    def rotate(self, name: str, value: str) -> SecretInfo:
        """A new value for an existing secret, keeping its scopes and expiry."""
        info = self.info(name)
        return self.set(name, value, scopes=info.scopes, expires_at=info.expires_at)

    def remove(self, name: str) -> None:
        """Forget a secret."""
        with self.db.transaction() as conn:
            if conn.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount == 0:
                raise NotFoundError(f"no secret named '{name}'")

    def info(self, name: str) -> SecretInfo:
        """Everything about a secret but its value."""
        row = (
            self.db.reader()
            .execute(
                "SELECT name, version, scopes, expires_at, updated_at FROM secrets WHERE name = ?",
                (name,),
            )
            .fetchone()
        )
        if row is None:
            raise NotFoundError(f"no secret named '{name}'")
        return SecretInfo(row[0], row[1], orjson.loads(row[2]), row[3], row[4])

    def entries(self) -> list[SecretInfo]:
        """Every secret, without values."""
        rows = self.db.reader().execute(
            "SELECT name, version, scopes, expires_at, updated_at FROM secrets ORDER BY name"
        )
        return [SecretInfo(r[0], r[1], orjson.loads(r[2]), r[3], r[4]) for r in rows]

    def get(self, name: str, *, scope: str, now: float | None = None) -> str:
        """The value, for a holder of ``scope``; SecretError if not granted or expired."""
        row = (
            self.db.reader()
            .execute(
                "SELECT version, nonce, ciphertext, scopes, expires_at FROM secrets WHERE name = ?",
                (name,),
            )
            .fetchone()
        )
        if row is None:
            raise SecretError(f"secret '{name}' is not in this node's vault (edgeos secrets set)")
        version, nonce, sealed, scopes, expires_at = row
        if scope not in orjson.loads(scopes):
            raise SecretNotGranted(f"secret '{name}' is not granted to scope '{scope}'")
        if expires_at is not None and expires_at <= (time.time() if now is None else now):
            raise SecretError(
                f"secret '{name}' expired; rotate it or ask the fleet for a new grant"
            )
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
