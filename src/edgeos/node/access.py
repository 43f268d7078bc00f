"""The gate in front of the node's HTTP API: a token on every route but the health checks.

An ASGI middleware: it reads ``Authorization: Bearer TOKEN``, asks
:func:`edgeos.node.tokens.authenticate` who that is, checks the scope the route needs
(:func:`required_scope`), and passes the request on with its
:class:`~edgeos.node.tokens.Principal` in ``request.state.principal``. Refusals are 401
(no, unknown, revoked or expired token; with ``WWW-Authenticate``) or 403 (a scope
missing), in the error shape of the API asked: OpenAI's under ``/v1``, ``{"error": ...}``
elsewhere. When the node asks for client certificates (``tls_client_ca_file``,
:mod:`edgeos.node.api_tls`), a caller off the device that presented none is refused (401)
before its token is looked at.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from edgeos.errors import AuthenticationError, EdgeOSError
from edgeos.node import tokens
from edgeos.state import Database

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Answered without a token: probes of load balancers, service managers and container
#: runtimes, which say nothing about the node's data.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def required_scope(method: str, path: str) -> tuple[str, str | None]:
    """(the scope a request needs, the agent or model it acts on when the path names one).

    ``/v1`` names its model in the body: the route checks it (``infer:MODEL``)."""
    parts = path.strip("/").split("/")
    if parts[0] == "v2" and len(parts) > 2 and parts[1] == "models":
        return "infer", parts[2]  # /v2/models/NAME[/versions/V][/ready|/infer]
    if parts[0] in ("v1", "v2"):
        return "infer", None
    if parts[0] == "api" and len(parts) > 1:
        if parts[1] == "approvals":
            return "approve", None
        if parts[1] == "events" and method == "POST":
            return "run", None
        if parts[1] == "agents" and method == "POST" and len(parts) == 4:
            return "run", parts[2]  # /api/agents/NAME/runs, /api/agents/NAME/webhook
    return "read", None  # /api/agents, /api/runs/ID, /api/status, /metrics, and the rest


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, to listen on or of a peer) is this machine only."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _has_certificate(scope: Scope) -> bool:
    tls = (scope.get("extensions") or {}).get("tls") or {}
    return bool(tls.get("client_cert_chain"))


def _on_device(scope: Scope) -> bool:
    """Whether the request comes from this machine: from loopback, or from the very address
    it came in on (a command on the device calling the node's LAN address). Off-path
    senders cannot forge either: TCP answers them on this machine."""
    client, server = scope.get("client"), scope.get("server")
    if client is None:
        return False
    return is_loopback(str(client[0])) or (server is not None and client[0] == server[0])


def _presented(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if kind.lower() == "bearer" and token.strip() else None
    return None


class ApiAccess:
    """Checks every HTTP request against the node's tokens before ``app`` sees it."""

    def __init__(
        self,
        app: ASGIApp,
        db: Database,
        local: tokens.LocalToken | None,
        *,
        certificates: bool = False,
    ) -> None:
        self.app = app
        self.db = db
        self.local = local
        #: Whether callers off the device must have presented a client certificate (the
        #: handshake checked it against the client CA; here only its presence is left).
        self.certificates = certificates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        needed, agent = required_scope(scope["method"], scope["path"])
        try:
            if self.certificates and not _has_certificate(scope) and not _on_device(scope):
                raise AuthenticationError(
                    "this API asks callers off the device for a client certificate of its "
                    "client CA (tls_client_ca_file), besides a token: present one"
                )
            token = _presented(scope)
            if token is None:
                raise AuthenticationError(
                    "this API needs a token: send Authorization: Bearer TOKEN (on the device, "
                    f"the node's {tokens.LOCAL_TOKEN_FILE} file in its data directory; "
                    "elsewhere one made with edgeos node token create)"
                )
            local = self.local.current() if self.local is not None else None
            principal = tokens.authenticate(self.db, token, local)
            principal.require(needed, agent)
            tokens.note_use(self.db, principal)
        except EdgeOSError as exc:
            log.info("refused %s %s: %s", scope["method"], scope["path"], exc)
            await _refuse(scope, send, exc)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, exc: EdgeOSError) -> None:
    status = exc.http_status
    body: dict[str, Any]
    if scope["path"].startswith("/v1/"):  # OpenAI clients read this shape
        kind = "authentication_error" if status == 401 else "permission_error"
        code = "invalid_api_key" if status == 401 else "insufficient_scope"
        body = {"error": {"message": str(exc), "type": kind, "param": None, "code": code}}
    else:
        body = {"error": str(exc)}
    headers = [(b"content-type", b"application/json")]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="edgeos-node"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": orjson.dumps(body)})
