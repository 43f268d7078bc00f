"""Operator tokens (who may read, deploy, administer) and join tokens (who may enroll).

Only the SHA-256 of a token's secret is stored; the token itself is shown once, when it
is made. Every function here works inside the caller's transaction.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgeos.errors import AuthenticationError, ConfigError, ConflictError, NotFoundError
from edgeos.fleet import tables
from edgeos.security.tokens import format_token, hash_secret, new_secret

#: Scopes from weakest to strongest; each implies the ones before it.
SCOPES = ("read", "deploy", "admin")
GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,127}$")
#: The longest a join token may live: a leaked long-lived token is a standing invitation.
MAX_JOIN_TTL_S = 30 * 86400.0
MAX_JOIN_USES = 1_000_000


def expand_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """Every scope the given ones grant (admin ⊇ deploy ⊇ read); ConfigError for unknown ones."""
    granted: set[str] = set()
    for scope in scopes:
        if scope not in SCOPES:
            raise ConfigError(f"scope {scope!r}: use one of {', '.join(SCOPES)}")
        granted.update(SCOPES[: SCOPES.index(scope) + 1])
    return frozenset(granted)


def check_group(group: str) -> str:
    """``group`` if it is a valid group name, else ConfigError."""
    if not GROUP.match(group):
        raise ConfigError(
            f"group {group!r}: use 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return group


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def create_operator_token(
    conn: Connection, *, name: str, scopes: Iterable[str], created_by: str, pin: str
) -> tuple[str, str]:
    """A new operator token; returns ``(id, token)``. The token is not stored."""
    if not _NAME.match(name):
        raise ConfigError(f"token name {name!r}: use 1-128 letters, digits, spaces or . _ @ -")
    granted = expand_scopes(scopes)
    if not granted:
        raise ConfigError("a token needs a scope: read, deploy or admin")
    secret = new_secret()
    token_id = _new_id("op")
    conn.execute(
        sa.insert(tables.operator_tokens).values(
            id=token_id,
            name=name,
            token_hash=hash_secret(secret),
            scopes=",".join(s for s in SCOPES if s in granted),
            created_at=time.time(),
            created_by=created_by,
            revoked_at=None,
        )
    )
    return token_id, format_token(secret, pin)


def operator_tokens(conn: Connection) -> list[dict[str, Any]]:
    """Every operator token (without secrets), oldest first."""
    t = tables.operator_tokens
    rows = conn.execute(
        sa.select(
            t.c.id, t.c.name, t.c.scopes, t.c.created_at, t.c.created_by, t.c.revoked_at
        ).order_by(t.c.created_at, t.c.id)
    ).mappings()
    return [{**row, "scopes": row["scopes"].split(",")} for row in rows]


def revoke_operator_token(conn: Connection, token_id: str) -> None:
    """Revoke a token: it is refused from its next request on. NotFoundError if unknown."""
    t = tables.operator_tokens
    done = conn.execute(
        sa.update(t)
        .where(t.c.id == token_id, t.c.revoked_at.is_(None))
        .values(revoked_at=time.time())
    )
    if done.rowcount == 0:
        exists = conn.execute(sa.select(t.c.id).where(t.c.id == token_id)).first()
        if exists is None:
            raise NotFoundError(f"no operator token {token_id!r}")
        return
    # Revoked inside the caller's transaction: refusing rolls it back. No admin token
    # left would lock every operator out of tokens, devices and join tokens for good.
    admins = conn.execute(
        sa.select(sa.func.count())
        .select_from(t)
        .where(t.c.revoked_at.is_(None), t.c.scopes.like("%admin%"))
    ).scalar_one()
    if admins == 0:
        raise ConflictError(
            f"operator token {token_id} is the last admin token: create another admin "
            "token first (edgeos fleet token create NAME --scope admin), then revoke this one"
        )


def has_operator_tokens(conn: Connection) -> bool:
    """Whether any operator token was ever made (the first one is made at init)."""
    return conn.execute(sa.select(tables.operator_tokens.c.id).limit(1)).first() is not None


@dataclass(frozen=True)
class JoinToken:
    """A join token as made: the token itself is shown once."""

    id: str
    token: str
    group: str
    expires_at: float
    uses: int


def create_join_token(
    conn: Connection, *, group: str, ttl_s: float, uses: int, created_by: str, pin: str,
    replaces: str | None = None,
) -> JoinToken:  # fmt: skip
    """A token that enrolls up to ``uses`` devices into ``group`` within ``ttl_s`` seconds.

    With ``replaces`` (an enrolled device's id), it enrolls one device as that device's
    replacement (see :mod:`edgeos.fleet.memory_backups`).
    """
    check_group(group)
    if replaces is not None and uses != 1:
        raise ConfigError(
            f"a join token replacing device {replaces} enrolls one device, not {uses}"
        )
    if not 0 < ttl_s <= MAX_JOIN_TTL_S:
        raise ConfigError(f"join token lifetime {ttl_s} s: use more than 0 and at most 30 days")
    if not 1 <= uses <= MAX_JOIN_USES:
        raise ConfigError(f"join token uses {uses}: use 1 to {MAX_JOIN_USES}")
    secret = new_secret()
    now = time.time()
    token = JoinToken(_new_id("jt"), format_token(secret, pin), group, now + ttl_s, uses)
    conn.execute(
        sa.insert(tables.join_tokens).values(
            id=token.id,
            token_hash=hash_secret(secret),
            group_name=group,
            expires_at=token.expires_at,
            uses_left=uses,
            created_by=created_by,
            created_at=now,
            replaces=replaces,
        )
    )
    return token


def use_join_token(conn: Connection, secret: str, *, now: float) -> tuple[str, str]:
    """Spend one use of the join token with ``secret``; returns ``(token id, group)``.

    AuthenticationError when the token is unknown, expired or used up. The decrement is
    conditional, so two devices racing for the last use cannot both win.
    """
    t = tables.join_tokens
    row = conn.execute(
        sa.select(t.c.id, t.c.group_name, t.c.expires_at, t.c.uses_left).where(
            t.c.token_hash == hash_secret(secret)
        )
    ).first()
    if row is None:
        raise AuthenticationError("unknown join token")
    if row.expires_at <= now:
        raise AuthenticationError(f"join token {row.id} expired")
    spent = conn.execute(
        sa.update(t).where(t.c.id == row.id, t.c.uses_left > 0).values(uses_left=t.c.uses_left - 1)
    )
    if row.uses_left <= 0 or spent.rowcount == 0:
        raise AuthenticationError(f"join token {row.id} was already used")
    return str(row.id), str(row.group_name)
