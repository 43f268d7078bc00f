"""Keys, the fleet CA, certificates, token secrets and pins, TLS contexts.

Imports nothing of edgeos but :mod:`edgeos.errors`. The names below need only the
standard library and ``cryptography``; httpx is imported by :func:`fetch_ca` when called,
and uvicorn only by :mod:`edgeos.security.uvicorn_tls`, which the fleet server imports
(through :func:`uvicorn_ssl_options`) and nothing else does.
"""

from __future__ import annotations

from edgeos.security.certs import (
    CertificateAuthority,
    DeviceCertificate,
    IssuedCertificate,
    certificate_info,
    make_csr,
    verify_device_certificate,
)
from edgeos.security.keys import (
    generate_key,
    load_private_key,
    write_private_key,
    write_public_file,
)
from edgeos.security.tls import (
    ServerTLS,
    client_ssl_context,
    fetch_ca,
    peer_certificate,
    uvicorn_ssl_options,
)
from edgeos.security.tokens import (
    format_token,
    hash_secret,
    new_secret,
    parse_token,
    pin_of,
    same,
)

__all__ = [
    "CertificateAuthority",
    "DeviceCertificate",
    "IssuedCertificate",
    "ServerTLS",
    "certificate_info",
    "client_ssl_context",
    "fetch_ca",
    "format_token",
    "generate_key",
    "hash_secret",
    "load_private_key",
    "make_csr",
    "new_secret",
    "parse_token",
    "peer_certificate",
    "pin_of",
    "same",
    "uvicorn_ssl_options",
    "verify_device_certificate",
    "write_private_key",
    "write_public_file",
]
