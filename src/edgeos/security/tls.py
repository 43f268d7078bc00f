"""TLS between nodes, operators and the fleet.

The fleet serves HTTPS with a server certificate from its own CA and *asks* for a client
certificate without requiring one: enrollment and operator calls come without, device
calls with one, and a certificate that does not chain to the fleet CA fails the handshake.
The certificate reaches the app in the ASGI TLS extension (``scope["extensions"]["tls"]``,
filled by :class:`edgeos.security.uvicorn_tls.ClientCertProtocol`), where
:func:`peer_certificate` reads it.

Clients trust the fleet CA alone, never the system's store. They get it by
:func:`fetch_ca`: over TLS *without* verification, checked against the pin in their token.

httpx and uvicorn are imported inside the functions that use them, so a node that imports
this module pays for neither until it talks to a fleet.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeos.errors import ConfigError, UnavailableError, VerificationError
from edgeos.security.tokens import same

CA_PATH = "/api/v1/ca"
"""Where a fleet serves its CA certificate (PEM), without authentication."""

# A CA certificate is about a kilobyte; anything much longer is not one.
_MAX_CA_BYTES = 64 * 1024

# IANA numbers the ASGI TLS extension uses for ``tls_version``.
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


@dataclass(frozen=True)
class ServerTLS:
    """The files a TLS fleet server needs: its key and certificate, and the device CA."""

    keyfile: Path
    certfile: Path
    ca_certs: Path

    @classmethod
    def in_dir(cls, keys_dir: Path) -> ServerTLS:
        """The layout of a fleet's ``keys/``: ``server.key``, ``server.crt``, ``ca.crt``."""
        keys_dir = Path(keys_dir)
        return cls(keys_dir / "server.key", keys_dir / "server.crt", keys_dir / "ca.crt")

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.Config`` (see :func:`uvicorn_ssl_options`)."""
        return uvicorn_ssl_options(self.keyfile, self.certfile, self.ca_certs)


def uvicorn_ssl_options(keyfile: Path, certfile: Path, ca_certs: Path) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for a fleet server: TLS, optional client certs.

    ``ssl_cert_reqs=CERT_OPTIONAL`` lets clients without a certificate in (enrollment,
    operators) while a presented certificate must chain to ``ca_certs``; ``http`` is the
    protocol that puts the client certificate into the ASGI scope.
    """
    for path in (keyfile, certfile, ca_certs):
        if not Path(path).is_file():
            raise ConfigError(f"TLS file {path} does not exist")
    # Imported here: uvicorn is the fleet server's business, not every importer's.
    from edgeos.security.uvicorn_tls import ClientCertProtocol

    return {
        "ssl_keyfile": str(keyfile),
        "ssl_certfile": str(certfile),
        "ssl_ca_certs": str(ca_certs),
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "http": ClientCertProtocol,
    }


def tls_extension(ssl_object: ssl.SSLObject | None) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection, or None when it is not TLS.

    Only the client's own certificate is known (Python does not expose the chain it sent);
    it was verified against the CA during the handshake, so no error is ever reported.
    """
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    chain: list[str] = []
    name: str | None = None
    if der:
        cert = x509.load_der_x509_certificate(der)
        chain.append(cert.public_bytes(serialization.Encoding.PEM).decode())
        name = cert.subject.rfc4514_string()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


def peer_certificate(scope: Mapping[str, Any]) -> str | None:
    """The client certificate (PEM) of the request in ``scope``, or None if it sent none."""
    extensions = scope.get("extensions") or {}
    tls = extensions.get("tls") or {}
    chain = tls.get("client_cert_chain") or ()
    first = next(iter(chain), None)
    return first if isinstance(first, str) else None


def client_ssl_context(
    ca_pem: str, cert_path: Path | None = None, key_path: Path | None = None
) -> ssl.SSLContext:
    """A client context that trusts the fleet CA only, presenting a device cert if given."""
    if (cert_path is None) != (key_path is None):
        raise ConfigError("a client certificate needs both its certificate and its key file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"the fleet CA is not a usable PEM certificate: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Strict checking everywhere, as Python 3.13 does by default: certificates that pass
    # here pass on every supported Python.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if cert_path is not None and key_path is not None:
        try:
            context.load_cert_chain(cert_path, key_path)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot use the client certificate {cert_path} with key {key_path}: {exc}"
            ) from exc
    return context


def pinned_context(certificate: Path) -> ssl.SSLContext:
    """A client context that accepts exactly the server certificate in ``certificate``
    (its first PEM block), whatever names it carries: how a command on the device reaches
    its own node, on loopback, though the certificate names the device's network names."""
    try:
        text = certificate.read_text()
        end = "-----END CERTIFICATE-----"
        # The leaf alone: trusting a CA of the chain too would accept any of its certificates.
        pem = text[: text.index(end) + len(end)] if end in text else text
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=pem)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot trust the node's certificate {certificate}: {exc}") from exc
    context.check_hostname = False  # the certificate itself is pinned, not a CA
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def fetch_ca(base_url: str, pin: str, *, timeout: float = 10.0) -> str:
    """The fleet CA (PEM) from ``base_url``, accepted only if its pin is ``pin``.

    The request is made without verifying the server: there is nothing to verify it with
    yet, and the pin from the token is the trust anchor. VerificationError when the pin
    does not match; UnavailableError (retryable) when the fleet does not answer.
    """
    import httpx  # lazily: a node only needs it once it talks to a fleet

    base = base_url.rstrip("/")
    if not base.startswith("https://"):
        raise ConfigError(f"the fleet URL must start with https://, not {base_url!r}")
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    try:
        with (
            httpx.Client(verify=unverified, timeout=timeout) as client,
            client.stream("GET", base + CA_PATH) as response,
        ):
            if response.status_code >= 500 or response.status_code == 429:
                raise UnavailableError(
                    f"the fleet at {base} answered {response.status_code} for {CA_PATH}"
                )
            if response.status_code != 200:
                raise VerificationError(
                    f"{base} answered {response.status_code} for {CA_PATH}: is it an edgeos fleet?"
                )
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > _MAX_CA_BYTES:
                    raise VerificationError(f"{base} sent more than a CA certificate")
    except httpx.InvalidURL as exc:
        raise ConfigError(f"invalid fleet URL {base_url!r}: {exc}") from exc
    except httpx.TransportError as exc:
        raise UnavailableError(f"the fleet at {base} does not answer: {exc}") from exc
    return _pinned_ca(bytes(body), pin.strip().lower(), base)


def _pinned_ca(body: bytes, pin: str, base: str) -> str:
    try:
        cert = x509.load_pem_x509_certificate(body)
    except ValueError as exc:
        raise VerificationError(f"{base} did not serve a PEM certificate at {CA_PATH}") from exc
    actual = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    if not same(actual, pin):
        raise VerificationError(
            f"the fleet at {base} presents CA {actual[:12]}..., the token expects "
            f"{pin[:12]}...: wrong fleet or a man in the middle"
        )
    # The pinned certificate alone, re-encoded: anything else in the body (a second
    # certificate, say) must never reach a trust store.
    return cert.public_bytes(serialization.Encoding.PEM).decode()
