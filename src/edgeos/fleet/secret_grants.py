"""Secret grants: credentials the fleet hands to devices, sealed all the way.

An operator grants a secret by name to one device or to every device of a group, for the
scopes that may read it on the device, until an expiry. The fleet keeps the value only
encrypted (AES-256-GCM under ``DATA/keys/secrets.key``, shared by the replicas like the
other keys), with every field of the grant as associated data, so an edited row does not
decrypt. A device fetches its grants (``GET /api/v1/secrets``) and gets each one sealed to
the public key of the certificate it presented (:mod:`edgeos.security.sealing`), bound to
its device id: neither a TLS terminator, nor a log, nor a dump of the database holds a
value a device could use, and a grant sealed for one device opens on no other.

A device has at most one grant per name in force: its own over its group's, the newest
of those. Granting and revoking move the revisions of the devices the grant is for (and
no other's), so their long polls wake and they fetch their grants again; a revoked or
expired grant is no longer sent, and the node deletes the secret. Revoking also erases
the stored value. Every action is audited, never with the value.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.engine import Connection

from edgeos.errors import ConfigError, ConflictError, NotFoundError
from edgeos.files import write_new
from edgeos.fleet import tables
from edgeos.fleet.db import nudge_device, nudge_group
from edgeos.fleet.operators import check_group
from edgeos.protocol.fleet import SealedSecret
from edgeos.security.sealing import seal

#: The key that encrypts grant values at rest, beside the fleet's other keys.
KEY_FILE = "secrets.key"
#: The longest a grant may last: a credential is to be renewed, not kept for ever.
MAX_LIFETIME_S = 366 * 86400.0
#: The largest value a grant may carry.
MAX_VALUE_BYTES = 64 * 1024
# The node's vault takes the same names and scopes (edgeos.connectors.vault).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SCOPE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,63}$")

_G = tables.secret_grants
log = logging.getLogger("edgeos.fleet.secrets")


def load_secrets_key(keys_dir: Path) -> bytes:
    """The key of grant values at rest, made on first use (0600).

    Made once even when replicas race: the file is linked into place only if absent, and
    whoever loses reads the winner's key.
    """
    path = Path(keys_dir) / KEY_FILE
    if not path.exists():
        write_new(path, os.urandom(32))
    key = path.read_bytes()
    if len(key) != 32:
        raise ConfigError(f"{path} is not a secrets key ({len(key)} bytes, expected 32)")
    return key


@dataclass(frozen=True)
class GrantTarget:
    """Whom a grant is for: one device, or every device of a group."""

    device_id: str | None = None
    group: str | None = None

    def __str__(self) -> str:
        return f"device/{self.device_id}" if self.device_id else f"group/{self.group}"


def _aad(row: Mapping[Any, Any]) -> bytes:
    """Every field of a grant, bound to its value at rest."""
    fields = ("id", "name", "version", "device_id", "group_name", "scopes", "expires_at")
    return orjson.dumps(["edgeos-fleet-secret/1", *(row[f] for f in fields)])


def _aead(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def check_grant(name: str, value: str, scopes: list[str], expires_s: float) -> list[str]:
    """The grant's scopes, sorted; ConfigError naming the first bad field."""
    if not NAME.match(name):
        raise ConfigError(f"secret name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - ")
    if not value:
        raise ConfigError(f"secret {name!r}: the value is empty")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise ConfigError(f"secret {name!r}: the value is over {MAX_VALUE_BYTES} bytes")
    out = sorted(set(scopes))
    if not out:
        raise ConfigError(f"secret {name!r}: give at least one scope allowed to read it")
    for scope in out:
        if not SCOPE.match(scope):
            raise ConfigError(
                f"secret {name!r}: scope {scope!r}: use 1-64 of A-Z a-z 0-9 _ . : - starting "
                "with a letter, digit or _"
            )
    if not 0 < expires_s <= MAX_LIFETIME_S:
        raise ConfigError(
            f"secret {name!r}: expires_s {expires_s}: use more than 0, at most 366 days"
        )
    return out


def _check_target(conn: Connection, target: GrantTarget) -> None:
    if (target.device_id is None) == (target.group is None):
        raise ConfigError("a grant is for one device or for one group: give exactly one")
    if target.device_id is not None:
        d = tables.devices
        row = conn.execute(sa.select(d.c.status).where(d.c.id == target.device_id)).first()
        if row is None:
            raise NotFoundError(f"no device {target.device_id}")
        if row.status != "active":
            raise ConflictError(f"device {target.device_id} is revoked: it gets no secrets")
        return
    group = check_group(str(target.group))
    d = tables.devices
    if conn.execute(sa.select(d.c.id).where(d.c.group_name == group).limit(1)).first() is None:
        raise NotFoundError(f"no device in group {group!r}: check the name (edgeos fleet devices)")


def create_grant(
    conn: Connection,
    key: bytes,
    *,
    name: str,
    value: str,
    target: GrantTarget,
    scopes: list[str],
    expires_s: float,
    actor: str,
    now: float | None = None,
) -> dict[str, Any]:
    """Store a grant (the value encrypted) and wake its devices; its description."""
    scope_list = check_grant(name, value, scopes, expires_s)
    _check_target(conn, target)
    now = time.time() if now is None else now
    version = 1 + int(
        conn.execute(sa.select(sa.func.max(_G.c.version)).where(_G.c.name == name)).scalar() or 0
    )
    fields = {
        "id": f"grant-{uuid.uuid4().hex[:16]}", "name": name, "version": version,
        "device_id": target.device_id, "group_name": target.group,
        "scopes": orjson.dumps(scope_list).decode(), "expires_at": now + expires_s,
    }  # fmt: skip
    nonce = os.urandom(12)
    sealed = _aead(key).encrypt(nonce, value.encode(), _aad(fields))
    conn.execute(
        sa.insert(_G).values(
            **fields, nonce=nonce, ciphertext=sealed, created_at=now, created_by=actor
        )
    )
    _wake(conn, target.device_id, target.group)
    return describe(conn, str(fields["id"]))


_LISTED = (
    _G.c.id, _G.c.name, _G.c.version, _G.c.device_id, _G.c.group_name, _G.c.scopes,
    _G.c.expires_at, _G.c.created_at, _G.c.created_by, _G.c.revoked_at, _G.c.revoked_by,
)  # fmt: skip


def _public(row: Any, now: float) -> dict[str, Any]:
    out = dict(row._mapping)
    out["scopes"] = orjson.loads(out["scopes"])
    out["group"] = out.pop("group_name")
    out["state"] = (
        "revoked" if out["revoked_at"] is not None else
        "expired" if out["expires_at"] <= now else "active"
    )  # fmt: skip
    return out


def describe(conn: Connection, grant_id: str) -> dict[str, Any]:
    """One grant, without its value; NotFoundError when there is none."""
    row = conn.execute(sa.select(*_LISTED).where(_G.c.id == grant_id)).first()
    if row is None:
        raise NotFoundError(f"no secret grant {grant_id}")
    return _public(row, time.time())


def list_grants(
    conn: Connection,
    *,
    name: str | None = None,
    device_id: str | None = None,
    group: str | None = None,
    active_only: bool = False,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """Grants, newest first, without values; filtered by name, device, group, state."""
    now = time.time() if now is None else now
    query = sa.select(*_LISTED).order_by(_G.c.created_at.desc(), _G.c.id)
    for column, value in ((_G.c.name, name), (_G.c.device_id, device_id), (_G.c.group_name, group)):
        if value:
            query = query.where(column == value)
    if active_only:
        query = query.where(_G.c.revoked_at.is_(None), _G.c.expires_at > now)
    return [_public(row, now) for row in conn.execute(query)]


def revoke_grant(
    conn: Connection, grant_id: str, *, actor: str, now: float | None = None
) -> dict[str, Any]:
    """Revoke a grant: its value is erased, and devices drop it at their next sync."""
    row = conn.execute(
        sa.select(_G.c.revoked_at, _G.c.device_id, _G.c.group_name).where(_G.c.id == grant_id)
    ).first()
    if row is None:
        raise NotFoundError(f"no secret grant {grant_id}")
    if row.revoked_at is not None:
        raise ConflictError(f"secret grant {grant_id} is revoked already")
    conn.execute(
        sa.update(_G)
        .where(_G.c.id == grant_id)
        .values(revoked_at=time.time() if now is None else now, revoked_by=actor, ciphertext=b"")
    )
    _wake(conn, row.device_id, row.group_name)
    return describe(conn, grant_id)


def _wake(conn: Connection, device_id: str | None, group: str | None) -> None:
    """Wake the long polls of the devices a grant is for, and no other's: each fetches
    its grants after the sync this wakes."""
    if device_id is not None:
        nudge_device(conn, device_id)
    elif group is not None:
        nudge_group(conn, group)


def sealed_grants(
    conn: Connection,
    key: bytes,
    *,
    device_id: str,
    group: str,
    public_key: ec.EllipticCurvePublicKey,
    now: float | None = None,
) -> list[SealedSecret]:
    """The grants in force for a device, each sealed to ``public_key`` and bound to the
    device id; one per name (the device's own over its group's, then the newest)."""
    now = time.time() if now is None else now
    rows = conn.execute(
        sa.select(_G)
        .where(
            sa.or_(_G.c.device_id == device_id, _G.c.group_name == group),
            _G.c.revoked_at.is_(None),
            _G.c.expires_at > now,
        )
        .order_by(_G.c.name, _G.c.device_id.is_(None), _G.c.version.desc())
    )
    aead, out, seen = _aead(key), [], set()
    for row in rows:
        if row.name in seen:
            continue
        seen.add(row.name)
        try:
            value = aead.decrypt(row.nonce, row.ciphertext, _aad(row._mapping))
        except InvalidTag:
            # Not sent, and the others still are: one damaged row must not cut a device off.
            log.error(
                "secret grant %s (%s) does not decrypt: its row was changed or keys/%s is not "
                "the key it was made with; not sent to device %s",
                row.id, row.name, KEY_FILE, device_id,
            )  # fmt: skip
            continue
        grant = SealedSecret(
            grant_id=row.id, name=row.name, version=row.version,
            scopes=orjson.loads(row.scopes), expires_at=row.expires_at, sealed="",
        )  # fmt: skip
        box = seal(public_key, value, grant.associated_data(device_id))
        out.append(grant.model_copy(update={"sealed": base64.b64encode(box).decode()}))
    return out
