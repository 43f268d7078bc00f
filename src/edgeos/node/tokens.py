"""Who may call the node's HTTP API: the local token and named, scoped API tokens.

Every route but the two health checks asks for ``Authorization: Bearer TOKEN``
(:mod:`edgeos.node.access` enforces it). Two kinds of token:

* **The local token**, ``DATA_DIR/api-token``: made at the node's first start, readable
  only by the node's user (0600). Whoever can read it can read the node's database
  and keys beside it, so it grants every scope: it is what the CLI and the demo use on the
  device itself. ``edgeos node token rotate-local`` replaces it: the running node accepts
  only the new one from its next request.
* **Named tokens** for other programs (an OpenAI client, a point of sale posting
  webhooks, a manager's approval app): ``edgeos node token create NAME --scope ...``
  prints the token once; the node keeps only its SHA-256. Revoked (``edgeos node token
  revoke NAME``) or expired tokens are refused from the next request on.

Scopes: ``read`` (agents, runs, status, metrics), ``infer`` (the V2 and OpenAI-compatible
model APIs; ``infer:MODEL`` for one model only), ``run`` (start runs, webhooks, events;
``run:AGENT`` for one agent's runs and webhook only), ``approve`` (list and answer
escalations; ``approve:AGENT`` for one agent's only).

A named token may also have a budget, ``cost_per_day``, for the calls the node relays for
it to paid venues (:mod:`edgeos.node.spending`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from edgeos.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    EdgeOSError,
    NotFoundError,
    PermissionDeniedError,
)
from edgeos.files import write_atomic, write_new
from edgeos.state import Database

#: The local token's file in the data directory.
LOCAL_TOKEN_FILE = "api-token"
#: Who the local token's calls are from, in the journal and logs.
LOCAL = "local"
#: Every scope a token may carry.
SCOPES = ("read", "infer", "run", "approve")
#: The scopes that may be narrowed to one agent or model, as ``run:AGENT``, ``infer:MODEL``.
NARROW_SCOPES = ("run", "approve", "infer")
#: Tokens start with this, so a secret scanner (and a person) can tell what one is.
PREFIX = "eosn_"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Agent and model names as agent.yaml and model manifests allow them (edgeos.manifests,
# which brings pydantic): the same rule for both.
_TARGET = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def new_secret() -> str:
    """A fresh token: the prefix and 256 random bits."""
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """What the node keeps of a named token."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scope(text: str) -> str:
    """``text`` if it is a scope a token may carry, else ConfigError naming the choices."""
    base, colon, target = text.partition(":")
    if base in SCOPES and not colon:
        return text
    if base in NARROW_SCOPES and _TARGET.match(target):
        return text
    raise ConfigError(
        f"unknown scope {text!r}: use {', '.join(SCOPES)}, or run:AGENT or approve:AGENT "
        "for one agent's runs or questions, or infer:MODEL for one model"
    )


@dataclass(frozen=True)
class Principal:
    """Who a request is from and what it may do."""

    name: str
    scopes: frozenset[str]
    #: The named token's digest (None for the local token): what its spending is kept by.
    digest: str | None = None
    #: What relayed calls may cost it in a sliding day (None: no limit).
    cost_per_day: float | None = None
    #: When the named token was last recorded as used (None: never).
    last_used_at: float | None = None

    @property
    def label(self) -> str:
        """How metrics name the calls it makes that no agent made."""
        return "(relayed)" if self.digest is None else f"(token {self.name})"

    def allows(self, scope: str, target: str | None = None) -> bool:
        """Whether it holds ``scope`` for ``target``, the agent (``run``, ``approve``) or
        model (``infer``) acted on: the scope itself, or the target's own ``scope:TARGET``."""
        if scope in self.scopes:
            return True
        return scope in NARROW_SCOPES and target is not None and f"{scope}:{target}" in self.scopes

    def holds(self, scope: str) -> bool:
        """Whether it holds ``scope`` for every agent or for some."""
        return scope in self.scopes or any(s.startswith(f"{scope}:") for s in self.scopes)

    def require(self, scope: str, target: str | None = None) -> None:
        """PermissionDeniedError unless :meth:`allows` (with no target named, for
        ``approve`` and ``infer``: unless it :meth:`holds` it for some; the route then
        checks which, once it knows)."""
        some = target is None and scope in ("approve", "infer") and self.holds(scope)
        if not (some or self.allows(scope, target)):
            held = ", ".join(sorted(self.scopes)) or "none"
            wanted = scope if target is None else f"{scope} (or {scope}:{target})"
            raise PermissionDeniedError(
                f"token '{self.name}' lacks the scope {wanted} (it has: {held}); create one "
                "that has it with: edgeos node token create NAME --scope ..."
            )


#: What the local token may do: everything.
LOCAL_PRINCIPAL = Principal(LOCAL, frozenset(SCOPES))


@dataclass(frozen=True)
class ApiToken:
    """A named token as the node keeps it (never the token itself)."""

    digest: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    cost_per_day: float | None = None
    last_used_at: float | None = None

    @property
    def state(self) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= time.time():
            return "expired"
        return "active"


def _token(row: sqlite3.Row | tuple[object, ...]) -> ApiToken:
    key, name, scopes, created, expires, revoked, budget, used = row
    return ApiToken(
        str(key), str(name), tuple(json.loads(str(scopes))), float(str(created)),
        None if expires is None else float(str(expires)),
        None if revoked is None else float(str(revoked)),
        None if budget is None else float(str(budget)),
        None if used is None else float(str(used)),
    )  # fmt: skip


_COLUMNS = "digest, name, scopes, created_at, expires_at, revoked_at, cost_per_day, last_used_at"


def create(
    db: Database,
    name: str,
    scopes: list[str],
    *,
    ttl_s: float | None = None,
    cost_per_day: float | None = None,
) -> tuple[ApiToken, str]:
    """A new named token: (what the node keeps, the token, to show once).

    ConfigError for a bad name, scope, lifetime or budget, or no scope; ConflictError when
    an active token already has the name (revoke it first).
    """
    if not _NAME.match(name):
        raise ConfigError(
            f"token name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name == LOCAL:
        raise ConfigError(f"'{LOCAL}' names the node's local token; choose another name")
    if not scopes:
        raise ConfigError(f"give the token at least one --scope ({', '.join(SCOPES)})")
    checked = tuple(sorted({parse_scope(s) for s in scopes}))
    if ttl_s is not None and ttl_s <= 0:
        raise ConfigError("a token's lifetime must be positive")
    if cost_per_day is not None and not cost_per_day >= 0:
        raise ConfigError(f"--cost-per-day must be 0 or more, not {cost_per_day}")
    secret = new_secret()
    now = time.time()
    expires = None if ttl_s is None else now + ttl_s
    with db.transaction() as conn:
        active = conn.execute(
            "SELECT 1 FROM api_tokens WHERE name = ? AND revoked_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (name, now),
        ).fetchone()
        if active:
            raise ConflictError(
                f"a token named '{name}' is active; revoke it first: "
                f"edgeos node token revoke {name}"
            )
        conn.execute(
            f"INSERT INTO api_tokens ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL, ?, NULL)",
            (digest(secret), name, json.dumps(checked), now, expires, cost_per_day),
        )
    return ApiToken(digest(secret), name, checked, now, expires, None, cost_per_day), secret


def tokens(db: Database) -> list[ApiToken]:
    """Every named token, revoked and expired ones included (oldest first)."""
    rows = db.reader().execute(f"SELECT {_COLUMNS} FROM api_tokens ORDER BY created_at")
    return [_token(row) for row in rows]


def revoke(db: Database, name: str) -> int:
    """Revoke the tokens named ``name`` that are not revoked yet; how many.
    NotFoundError when no token has that name."""
    with db.transaction() as conn:
        if not conn.execute("SELECT 1 FROM api_tokens WHERE name = ?", (name,)).fetchone():
            raise NotFoundError(f"no API token is named '{name}' (see: edgeos node token list)")
        cursor = conn.execute(
            "UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (time.time(), name),
        )
        return cursor.rowcount


def authenticate(db: Database, token: str, local: str | None) -> Principal:
    """Who ``token`` is: the local token, or an active named token.

    AuthenticationError for an unknown, revoked or expired token; read from the database
    on every call, so a revocation holds from the next request on.
    """
    if local is not None and hmac.compare_digest(token.encode(), local.encode()):
        return LOCAL_PRINCIPAL
    row = (
        db.reader()
        .execute(f"SELECT {_COLUMNS} FROM api_tokens WHERE digest = ?", (digest(token),))
        .fetchone()
    )
    if row is None:
        raise AuthenticationError("unknown API token")
    found = _token(row)
    if found.state == "revoked":
        raise AuthenticationError(f"API token '{found.name}' was revoked")
    if found.state == "expired":
        raise AuthenticationError(f"API token '{found.name}' expired")
    return Principal(
        found.name, frozenset(found.scopes), found.digest, found.cost_per_day, found.last_used_at
    )


#: A token's last use is written at most this often (seconds): a write a minute, not one
#: a request.
LAST_USE_EVERY = 60.0


def note_use(db: Database, principal: Principal, now: float | None = None) -> bool:
    """Record that the named token was presented, unless it was within
    :data:`LAST_USE_EVERY`; True when written. Best effort: a full disk writes nothing."""
    now = time.time() if now is None else now
    recent = principal.last_used_at is not None and principal.last_used_at > now - LAST_USE_EVERY
    if principal.digest is None or recent:
        return False
    try:
        with db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE api_tokens SET last_used_at = ? WHERE digest = ? "
                "AND (last_used_at IS NULL OR last_used_at <= ?)",
                (now, principal.digest, now - LAST_USE_EVERY),
            )
            return cursor.rowcount > 0
    except (EdgeOSError, sqlite3.Error):
        return False  # the request itself goes on: this is a record, not a check


# -- the local token ----------------------------------------------------------------------
def local_token_path(data_dir: Path) -> Path:
    """Where the node keeps its local token."""
    return data_dir / LOCAL_TOKEN_FILE


def ensure_local_token(data_dir: Path) -> str:
    """The local token, made (0600, durably) at the first call."""
    path = local_token_path(data_dir)
    if not path.exists():
        write_new(path, (new_secret() + "\n").encode())
    return read_local_token(data_dir)


def read_local_token(data_dir: Path) -> str:
    """The local token; AuthenticationError saying why it cannot be read."""
    path = local_token_path(data_dir)
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise AuthenticationError(
            f"{path} does not exist: the node makes it at its first start (edgeos node run)"
        ) from None
    except PermissionError:
        raise AuthenticationError(
            f"cannot read {path}: run this as the node's user (or root), or give the command "
            "a token of its own (edgeos node token create)"
        ) from None
    if not token.startswith(PREFIX):
        raise AuthenticationError(
            f"{path} does not hold an edgeos API token: delete it and restart the node"
        )
    return token


def rotate_local_token(data_dir: Path) -> None:
    """Replace the local token with a new one, atomically; the file keeps its owner (the
    node's user, when root rotates it) and mode 0600. AuthenticationError if there is none
    to replace (the node makes the first)."""
    path = local_token_path(data_dir)
    read_local_token(data_dir)  # says why, when there is none or it cannot be read
    owner = path.stat()
    write_atomic(path, (new_secret() + "\n").encode())
    if (owner.st_uid, owner.st_gid) != (os.getuid(), os.getgid()):
        os.chown(path, owner.st_uid, owner.st_gid)


class LocalToken:
    """The local token as its file holds it now: a stat per request, a read when the file
    changed, so a rotation holds from the next request. None when the file is gone."""

    def __init__(self, data_dir: Path) -> None:
        self.path = local_token_path(data_dir)
        self._seen: tuple[int, int, int] | None = None
        self._token: str | None = None

    def current(self) -> str | None:
        """The token the file holds, or None when there is no readable one."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._token = None, None
            return None
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            try:
                self._token = read_local_token(self.path.parent)
            except AuthenticationError:
                self._token = None
            self._seen = seen
        return self._token


def bearer(token: str | None) -> dict[str, str]:
    """The request headers that present ``token`` (none for None)."""
    return {} if token is None else {"Authorization": f"Bearer {token}"}
