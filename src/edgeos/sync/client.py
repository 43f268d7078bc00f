"""HTTP to the fleet: clients that trust the fleet CA alone and present the device
certificate, and the fleet's refusals (``ErrorBody``) as edgeos errors.

The fleet answers every refusal with ``{"error": code, "message": text}``; the code names
the error's class (``authentication``, ``permission_denied``, ...), and the status backs it
up for a fleet or proxy that sends something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from edgeos.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    EdgeOSError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    VerificationError,
)
from edgeos.protocol.fleet import ErrorBody
from edgeos.security.tls import client_ssl_context

M = TypeVar("M", bound=BaseModel)

_BY_CODE: dict[str, type[EdgeOSError]] = {
    "authentication": AuthenticationError,
    "permission_denied": PermissionDeniedError,
    "verification": VerificationError,
    "conflict": ConflictError,
    "not_found": NotFoundError,
    "unavailable": UnavailableError,
    "disk_full": UnavailableError,
    "config": ConfigError,
}
_BY_STATUS: dict[int, type[EdgeOSError]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    429: UnavailableError,
}


def fleet_client(
    base_url: str,
    ca_pem: str,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    timeout: float = 30.0,
) -> httpx.Client:
    """A blocking client for ``base_url`` that trusts ``ca_pem`` only (mTLS with a cert)."""
    context = client_ssl_context(ca_pem, cert, key)
    return httpx.Client(base_url=base_url.rstrip("/"), verify=context, timeout=timeout)


def async_fleet_client(
    base_url: str, ca_pem: str, *, cert: Path, key: Path, timeout: float
) -> httpx.AsyncClient:
    """The same as :func:`fleet_client`, for the event loop (a long poll can be cancelled)."""
    context = client_ssl_context(ca_pem, cert, key)
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), verify=context, timeout=timeout)


def fleet_error(response: httpx.Response, what: str) -> EdgeOSError:
    """The edgeos error for a refusal, carrying the fleet's own message."""
    status = response.status_code
    code, message = "", ""
    try:
        body = ErrorBody.model_validate_json(response.content)
        code, message = body.error, body.message
    except ValidationError:
        message = response.text[:300].strip() or response.reason_phrase
    kind = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if kind is None:
        kind = UnavailableError if status >= 500 else InvalidRequestError
    error = kind(f"the fleet refused {what} (HTTP {status}): {message}")
    if status >= 500:
        error.retryable = True
    return error


def parse_answer(response: httpx.Response, model: type[M], what: str) -> M:
    """The 2xx answer as ``model``; the mapped error otherwise, or when it does not parse."""
    if not response.is_success:
        raise fleet_error(response, what)
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise VerificationError(
            f"the fleet's answer to {what} is not a {model.__name__}: {exc.error_count()} "
            f"problem(s), first: {exc.errors()[0]['msg']}"
        ) from exc


def transport_error(exc: httpx.HTTPError, base_url: str, what: str) -> EdgeOSError:
    """A request that got no answer: retryable, naming the fleet and the cause."""
    return UnavailableError(
        f"the fleet at {base_url} did not answer {what}: {exc or type(exc).__name__}"
    )
