"""The fleet's certificate authority: device and server certificates, CSRs.

A device proves who it is with a client certificate whose subject CN is its device id
and OU its group, issued by the fleet CA from a CSR the device signed with its own key.
The CA checks the CSR (it parses, its signature holds, it names the device that asks) and
issues a short-lived certificate; :meth:`CertificateAuthority.verify_device` checks one
presented back (issuer, signature, validity, usage). Revocation is the fleet's database's
business, not this module's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeos.errors import AuthenticationError, ConfigError, VerificationError
from edgeos.security.keys import (
    generate_key,
    load_private_key,
    write_private_key,
    write_public_file,
)

CLOCK_SKEW = timedelta(minutes=5)
"""How far back a certificate's validity starts, for devices whose clock runs behind."""

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)

# Curves a device key may use: P-256 is what edgeos makes, P-384 costs nothing to allow.
_DEVICE_CURVES = (ec.SECP256R1, ec.SECP384R1)


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the CA just issued: the PEM, its serial (lowercase hex), its expiry."""

    pem: str
    serial: str
    not_after: float


@dataclass(frozen=True)
class DeviceCertificate:
    """What a device certificate says: device id (CN), group (OU), serial, validity."""

    device_id: str
    group: str
    serial: str
    not_before: float
    not_after: float


def make_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> str:
    """A PEM certificate signing request for ``device_id`` (subject CN), signed by ``key``."""
    try:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    except ValueError as exc:  # empty, or longer than the 64 characters a CN may hold
        raise ConfigError(f"device id {device_id!r} cannot be a certificate name: {exc}") from exc
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def certificate_info(pem: str) -> DeviceCertificate:
    """Read a device certificate without verifying it (a node reading its own expiry)."""
    return _describe(_load_pem(pem))


def serial_hex(cert: x509.Certificate) -> str:
    """A certificate's serial as the fleet stores it: lowercase hex, no leading zeros."""
    return format(cert.serial_number, "x")


class CertificateAuthority:
    """The fleet CA: an EC P-256 key and its self-signed certificate."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        if key.public_key().public_numbers() != _ec_public_key(cert).public_numbers():
            raise ConfigError("the CA key does not belong to the CA certificate")
        self._key = key
        self._cert = cert
        der = cert.public_bytes(serialization.Encoding.DER)
        self._pin = hashlib.sha256(der).hexdigest()
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        self._key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    @classmethod
    def create(cls, name: str = "edgeos fleet CA", *, days: int = 3650) -> CertificateAuthority:
        """A new CA: a fresh P-256 key and a self-signed certificate valid ``days``."""
        key = generate_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=days))
            # pathlen 0: the CA signs leaf certificates only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, key_path: Path, cert_path: Path) -> CertificateAuthority:
        """The CA saved in ``key_path`` and ``cert_path``; ConfigError naming a bad file."""
        key = load_private_key(key_path)
        try:
            pem = Path(cert_path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the CA certificate {cert_path}: {exc}") from exc
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError as exc:
            raise ConfigError(f"{cert_path} is not a PEM certificate") from exc
        constraints = _extension(cert, x509.BasicConstraints)
        if constraints is None or not constraints.ca:
            raise ConfigError(f"{cert_path} is not a CA certificate")
        if key.public_key().public_numbers() != _ec_public_key(cert).public_numbers():
            raise ConfigError(f"{key_path} is not the key of the certificate {cert_path}")
        return cls(key, cert)

    def save(self, key_path: Path, cert_path: Path) -> None:
        """Write the key (0600) and the certificate (0644), each atomically."""
        write_private_key(key_path, self._key)
        write_public_file(cert_path, self._cert_pem)

    @property
    def cert_pem(self) -> str:
        """The CA certificate, PEM: what ``GET /api/v1/ca`` serves."""
        return self._cert_pem

    @property
    def pin(self) -> str:
        """SHA-256 hex of the CA certificate's DER: the ``CAPIN`` part of every token."""
        return self._pin

    @property
    def not_after(self) -> float:
        """When the CA certificate expires (unix time)."""
        return self._cert.not_valid_after_utc.timestamp()

    def issue_device(
        self,
        csr_pem: str,
        *,
        device_id: str,
        group: str,
        validity: timedelta = timedelta(hours=24),
    ) -> IssuedCertificate:
        """A client certificate for ``device_id`` in ``group`` from the device's CSR.

        Refuses (VerificationError) a CSR that does not parse, whose signature does not
        hold (its subject or key was altered), whose key is not EC P-256/P-384, or that
        names another device.
        """
        if not group:
            raise ConfigError("a device certificate needs a group")
        if validity <= timedelta(0):
            raise ConfigError(f"certificate validity must be positive, not {validity}")
        csr, public_key = _load_csr(csr_pem)
        named = _single(csr.subject, NameOID.COMMON_NAME)
        if named != device_id:
            raise VerificationError(
                f"the CSR names device {named!r} but was sent for device {device_id!r}"
            )
        now = datetime.now(UTC)
        builder = (
            self._leaf_builder(public_key, now, now + validity)
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, group),
                    ]
                )
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        )
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            serial=serial_hex(cert),
            not_after=cert.not_valid_after_utc.timestamp(),
        )

    def issue_server(
        self, key: ec.EllipticCurvePrivateKey, hosts: list[str], *, days: int = 825
    ) -> str:
        """A TLS server certificate (PEM) for ``key``, valid for ``hosts`` (names or IPs)."""
        if not hosts:
            raise ConfigError("a server certificate needs at least one host name or address")
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = datetime.now(UTC)
        # Clients check the SANs; the CN is for people reading the certificate.
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])])
        cert = (
            self._leaf_builder(key.public_key(), now, now + timedelta(days=days))
            .subject_name(subject)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def verify_device(self, cert: str | bytes, *, now: float | None = None) -> DeviceCertificate:
        """Check a presented device certificate (PEM text or DER bytes) and say what it holds.

        AuthenticationError when it was not issued by this CA, is outside its validity,
        is not a client certificate, or lacks a device id or group. Revocation is not
        checked here: the fleet does that against its database.
        """
        return verify_device_certificate(cert, self._cert, now=now)

    def _leaf_builder(
        self, public_key: ec.EllipticCurvePublicKey, now: datetime, until: datetime
    ) -> x509.CertificateBuilder:
        # No leaf outlives the CA: a verifier would refuse the part beyond anyway.
        until = min(until, self._cert.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._key_id),
                critical=False,
            )
        )


def verify_device_certificate(
    cert: str | bytes, ca: x509.Certificate | str, *, now: float | None = None
) -> DeviceCertificate:
    """Check a device certificate against the fleet CA's certificate (no CA key needed:
    a node checks another device's certificate this way) and say what it holds.

    AuthenticationError when ``cert`` was not issued by ``ca``, is outside its validity,
    is not a client certificate, or lacks a device id or group. Revocation is not checked.
    """
    ca_cert = _load_pem(ca) if isinstance(ca, str) else ca
    parsed = _load_presented(cert)
    if parsed.issuer != ca_cert.subject or not _signed_by(ca_cert, parsed):
        raise AuthenticationError("certificate not issued by this fleet's CA")
    moment = time.time() if now is None else now
    info = _describe(parsed)
    if moment < info.not_before:
        raise AuthenticationError(
            f"certificate not valid before {_iso(info.not_before)}: check the device's clock"
        )
    if moment > info.not_after:
        raise AuthenticationError(
            f"certificate expired at {_iso(info.not_after)}, renew by enrolling again"
        )
    constraints = _extension(parsed, x509.BasicConstraints)
    usage = _extension(parsed, x509.ExtendedKeyUsage)
    if (constraints is not None and constraints.ca) or (
        usage is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usage
    ):
        raise AuthenticationError("certificate is not a device (client) certificate")
    if not info.device_id or not info.group:
        raise AuthenticationError("certificate names no device id (CN) or group (OU)")
    return info


def _signed_by(ca_cert: x509.Certificate, cert: x509.Certificate) -> bool:
    algorithm = cert.signature_hash_algorithm
    if algorithm is None:  # Ed25519 and the like: never ours
        return False
    try:
        _ec_public_key(ca_cert).verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm)
        )
    except (InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_csr(csr_pem: str) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise VerificationError("the CSR is not a PEM certificate signing request") from exc
    try:
        valid = csr.is_signature_valid
    except UnsupportedAlgorithm:
        valid = False
    if not valid:
        raise VerificationError(
            "the CSR's signature does not verify: it was altered or not signed by its key"
        )
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _DEVICE_CURVES):
        raise VerificationError("the CSR's key must be EC P-256 (or P-384)")
    return csr, key


def _load_pem(pem: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise VerificationError("not a PEM certificate") from exc


def _load_presented(cert: str | bytes) -> x509.Certificate:
    try:
        if isinstance(cert, str):
            return x509.load_pem_x509_certificate(cert.encode())
        if cert.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(cert)
        return x509.load_der_x509_certificate(cert)
    except ValueError as exc:
        raise AuthenticationError("the client certificate cannot be parsed") from exc


def _ec_public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError("the CA certificate does not hold an EC key")
    return key


def _single(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    """The one value of ``oid`` in ``name``, or "" when it is absent or repeated."""
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        return ""
    value = values[0].value
    return value if isinstance(value, str) else value.decode(errors="replace")


def _extension(cert: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _describe(cert: x509.Certificate) -> DeviceCertificate:
    return DeviceCertificate(
        device_id=_single(cert.subject, NameOID.COMMON_NAME),
        group=_single(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        serial=serial_hex(cert),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")
