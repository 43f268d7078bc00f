"""HTTPS for the node's API, and client certificates for callers off the device.

With ``tls_cert_file`` and ``tls_key_file`` the API serves HTTPS. With
``tls_client_ca_file`` too, the server asks every caller for a certificate: one that does
not chain to that CA (or is expired, or is on ``tls_client_crl_file``) fails the
handshake, and :class:`~edgeos.node.access.ApiAccess` refuses a caller off the device that
sent none. Callers on the device itself (from loopback, or from the address they call)
may come without one: the CLI, which holds the local token, and nothing that crosses a
network. A certificate never replaces
the token: both are needed, so revoking a caller's token cuts it off at once.

Each file is checked when the node starts, so a bad one stops it with its name instead of
failing every caller's handshake later.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from edgeos.errors import ConfigError
from edgeos.settings import NodeSettings

log = logging.getLogger(__name__)


def uvicorn_options(settings: NodeSettings) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for the API's TLS (none: plain HTTP);
    ConfigError naming the file when one cannot be used."""
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None or key is None:
        return {}
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot serve HTTPS with tls_cert_file {cert} and tls_key_file {key}: {exc}"
        ) from exc
    options: dict[str, Any] = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    ca = settings.tls_client_ca_file
    if ca is None:
        return options
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use tls_client_ca_file {ca} as a CA: {exc}") from exc
    if settings.tls_client_crl_file is not None:
        check_revocation_list(settings.tls_client_crl_file, ca)
    # Imported here: the protocol that hands the certificate to the app imports
    # cryptography, which a node without client certificates never needs.
    from edgeos.security.uvicorn_tls import ClientCertProtocol

    # Optional at the handshake: the CLI on loopback comes without one (see ApiAccess).
    options.update(ssl_ca_certs=str(ca), ssl_cert_reqs=ssl.CERT_OPTIONAL, http=ClientCertProtocol)
    return options


def check_revocation_list(crl_path: Path, ca_path: Path, now: float | None = None) -> None:
    """ConfigError unless ``crl_path`` holds a current revocation list signed by a CA of
    ``ca_path``: with any other, every client certificate would fail its handshake."""
    from cryptography import x509

    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
        authorities = x509.load_pem_x509_certificates(ca_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read tls_client_crl_file {crl_path}: {exc}") from exc
    if not any(
        crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
        for ca in authorities
    ):
        raise ConfigError(
            f"tls_client_crl_file {crl_path} is not signed by the CA of tls_client_ca_file "
            f"{ca_path}: a revocation list of that CA is needed"
        )
    next_update = crl.next_update_utc
    now = time.time() if now is None else now
    if next_update is not None and next_update.timestamp() < now:
        raise ConfigError(
            f"tls_client_crl_file {crl_path} expired on {next_update:%Y-%m-%d %H:%M} UTC: "
            "with it every client certificate would be refused; publish a new one"
        )


def check_callers(context: ssl.SSLContext, settings: NodeSettings) -> None:
    """What uvicorn's options cannot say, set on the server's ``context`` once loaded: the
    revocation list, and a log line for each client certificate a handshake refuses."""
    if settings.tls_client_crl_file is not None:
        context.load_verify_locations(cafile=settings.tls_client_crl_file)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.sslobject_class = _LoggedHandshakes


class _LoggedHandshakes(ssl.SSLObject):
    """The server side of each TLS connection, saying why a handshake refused the caller's
    certificate: asyncio and uvloop report a failed handshake only in debug mode, and an
    operator whose till cannot connect needs the reason (revoked, expired, another CA)."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except ssl.SSLCertVerificationError as exc:
            _refusals.note(exc.verify_message or exc.reason or str(exc))
            raise


class _Refusals:
    """Refused certificates, logged at most once a minute for each reason: a caller that
    keeps retrying, or a scanner, must not flood the log."""

    EVERY_S = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def note(self, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self.EVERY_S:
                self._since[reason] = self._since.get(reason, 0) + 1
                return
            self._last[reason] = now
            more = self._since.pop(reason, 0)
        log.warning(
            "refused a caller's client certificate at the TLS handshake: %s%s", reason,
            f" ({more} more since the last report)" if more else "",
        )  # fmt: skip


_refusals = _Refusals()
