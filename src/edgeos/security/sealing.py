"""Sealing data to one holder of an EC P-256 key, and keys derived from such a key.

``seal(public_key, data, aad)`` encrypts ``data`` so that only the holder of the matching
private key can read it: an ephemeral key pair agrees a secret with ``public_key`` (ECDH),
HKDF-SHA256 turns it into an AES-256-GCM key, and ``aad`` is bound as associated data, so
a sealed box opened with other associated data (another device, an edited field) fails.
The fleet seals secret grants to a device's certificate key this way; the device opens
them with :func:`open_sealed`.

``derived_key(private_key, purpose)`` is a symmetric key only the key's holder can make
again (HKDF over the private scalar): the node wraps its vault key with one, which binds
the vault to the device identity.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeos.errors import VerificationError

#: Sealed boxes start with this: a format version, so another scheme can follow.
SEAL_FORMAT = b"\x01"
_POINT_BYTES = 65  # an uncompressed P-256 point
_NONCE_BYTES = 12
_SEAL_INFO = b"edgeos sealed box v1"


def _hkdf(secret: bytes, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


def seal(public_key: ec.EllipticCurvePublicKey, data: bytes, aad: bytes) -> bytes:
    """``data`` sealed to the holder of ``public_key``'s private key, bound to ``aad``."""
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise VerificationError(f"cannot seal to a {public_key.curve.name} key: P-256 only")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    # The ephemeral point salts the derivation: each box has a key of its own.
    key = _hkdf(ephemeral.exchange(ec.ECDH(), public_key), _SEAL_INFO, salt=point)
    nonce = os.urandom(_NONCE_BYTES)
    return SEAL_FORMAT + point + nonce + AESGCM(key).encrypt(nonce, data, aad)


def open_sealed(private_key: ec.EllipticCurvePrivateKey, sealed: bytes, aad: bytes) -> bytes:
    """The data of a box :func:`seal` made for this key with this ``aad``.

    VerificationError when the box was made for another key, for other associated data,
    or was changed on the way.
    """
    head = len(SEAL_FORMAT) + _POINT_BYTES + _NONCE_BYTES
    if len(sealed) <= head or not sealed.startswith(SEAL_FORMAT):
        raise VerificationError("not a sealed box of a format this edgeos knows")
    point = sealed[len(SEAL_FORMAT) : len(SEAL_FORMAT) + _POINT_BYTES]
    nonce, body = sealed[head - _NONCE_BYTES : head], sealed[head:]
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        key = _hkdf(private_key.exchange(ec.ECDH(), peer), _SEAL_INFO, salt=point)
        return AESGCM(key).decrypt(nonce, body, aad)
    except (InvalidTag, ValueError) as exc:
        raise VerificationError(
            "the sealed box does not open: made for another key or other associated data, "
            "or changed on the way"
        ) from exc


def derived_key(private_key: ec.EllipticCurvePrivateKey, purpose: bytes) -> bytes:
    """A 32-byte key for ``purpose`` that only the holder of ``private_key`` can derive."""
    scalar = private_key.private_numbers().private_value.to_bytes(32, "big")
    return _hkdf(scalar, b"edgeos derived key v1: " + purpose)
