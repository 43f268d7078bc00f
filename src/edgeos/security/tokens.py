"""Token secrets and CA pins.

An operator or join token reads ``SECRET.CAPIN``: ``SECRET`` is a random URL-safe string
of which the fleet keeps only the SHA-256, and ``CAPIN`` is the SHA-256 of the fleet CA
certificate (DER), so whoever holds a token also knows which CA to trust.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeos.errors import AuthenticationError, VerificationError

# token_urlsafe draws from [A-Za-z0-9_-]: no dot, so the last dot separates the pin.
_SECRET = re.compile(r"[A-Za-z0-9_-]{16,}")
_PIN = re.compile(r"[0-9a-f]{64}")
TOKEN_FORM = "SECRET.CAPIN (a URL-safe secret, a dot, and the 64 hex digits of the CA pin)"


def new_secret() -> str:
    """A fresh random secret: 32 bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """The SHA-256 hex of ``secret``: what the fleet stores instead of the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def format_token(secret: str, pin: str) -> str:
    """The token ``SECRET.PIN`` handed to an operator or a device."""
    return f"{secret}.{pin.lower()}"


def parse_token(token: str) -> tuple[str, str]:
    """``(secret, pin)`` from ``SECRET.PIN``; AuthenticationError if it has another form.

    The message describes the expected form and never repeats the token, which may be a
    real secret with a typo in it.
    """
    secret, dot, pin = token.strip().rpartition(".")
    pin = pin.lower()
    if not dot or not _SECRET.fullmatch(secret) or not _PIN.fullmatch(pin):
        raise AuthenticationError(f"malformed token: expected {TOKEN_FORM}")
    return secret, pin


def pin_of(cert_pem: str) -> str:
    """The pin of a certificate: the SHA-256 hex of its DER encoding."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError as exc:
        raise VerificationError("not a PEM certificate: cannot compute its pin") from exc
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def same(a: str, b: str) -> bool:
    """Whether two secrets, hashes or pins are equal, in time independent of where they differ."""
    return hmac.compare_digest(a.encode(), b.encode())
