"""Dashboard sessions: a signed cookie naming the operator token, and its CSRF secret.

The cookie holds the token's id (never its secret), when the session ends, and a random
CSRF secret that every form that changes something must echo. It is signed with a key
derived from the fleet CA's key, so every replica (they share ``keys/``) accepts the
sessions of the others and a server with other keys accepts none. The token is looked up
again on every request: revoking it ends its sessions at once, and a scope change
applies at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgeos.errors import AuthenticationError
from edgeos.fleet import tables
from edgeos.fleet.auth import Operator
from edgeos.fleet.operators import expand_scopes

COOKIE = "edgeos_session"
#: How long a sign-in lasts.
SESSION_TTL_S = 8 * 3600.0
_CONTEXT = b"edgeos dashboard session v1\0"


@dataclass(frozen=True)
class Session:
    """A signed-in operator's session: which token, until when, and its CSRF secret."""

    token_id: str
    expires_at: float
    csrf: str


class SessionSigner:
    """Issues and checks session cookies with one HMAC key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_keys(cls, keys_dir: Path) -> SessionSigner:
        """The signer of the fleet whose keys are in ``keys_dir``."""
        return cls(hashlib.sha256(_CONTEXT + (keys_dir / "ca.key").read_bytes()).digest())

    def _sign(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._key, payload, "sha256").digest()).decode()

    def issue(
        self, token_id: str, *, now: float | None = None, ttl_s: float = SESSION_TTL_S
    ) -> tuple[Session, str]:
        """A new session for ``token_id`` and its cookie value."""
        now = time.time() if now is None else now
        session = Session(token_id, now + ttl_s, secrets.token_urlsafe(24))
        payload = orjson.dumps([session.token_id, session.expires_at, session.csrf])
        encoded = base64.urlsafe_b64encode(payload).decode()
        return session, f"{encoded}.{self._sign(payload)}"

    def check(self, cookie: str | None, *, now: float | None = None) -> Session:
        """The session ``cookie`` carries; AuthenticationError when missing, forged or expired."""
        if not cookie:
            raise AuthenticationError("not signed in")
        encoded, _, signature = cookie.partition(".")
        try:
            payload = base64.urlsafe_b64decode(encoded.encode())
        except ValueError as exc:
            raise AuthenticationError("the session cookie is malformed") from exc
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise AuthenticationError("the session cookie's signature does not match")
        token_id, expires_at, csrf = orjson.loads(payload)
        if (time.time() if now is None else now) >= expires_at:
            raise AuthenticationError("the session expired: sign in again")
        return Session(str(token_id), float(expires_at), str(csrf))


def session_operator(conn: Connection, session: Session) -> Operator:
    """The operator token behind ``session``, as it is now; AuthenticationError when it is
    gone or revoked."""
    t = tables.operator_tokens
    row = conn.execute(
        sa.select(t.c.id, t.c.name, t.c.scopes, t.c.revoked_at).where(t.c.id == session.token_id)
    ).first()
    if row is None:
        raise AuthenticationError(f"operator token {session.token_id} no longer exists")
    if row.revoked_at is not None:
        raise AuthenticationError(f"operator token {row.id} was revoked")
    return Operator(row.id, row.name, expand_scopes(row.scopes.split(",")))


def same_secret(given: str | None, expected: str) -> bool:
    """Whether a form's CSRF field is the session's secret (in constant time)."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
