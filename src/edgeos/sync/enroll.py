"""Enrollment: a join token in, a device identity (key, certificate, CA, TUF root) out.

The node fetches the fleet CA and accepts it only if its pin is the token's; chooses its
device id and makes its key, writing both *before* the request so that a retry after a
crash or a refusal reuses them (the fleet sees the same device); sends a CSR for that id;
and saves what the fleet answers, ``fleet.json`` last. A refusal (a spent or expired
token) leaves nothing but the key and id behind, which is what the next attempt wants.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from edgeos.errors import AuthenticationError, ConfigError, ConflictError, VerificationError
from edgeos.files import write_atomic
from edgeos.protocol.fleet import API, EnrollRequest, EnrollResponse, Inventory
from edgeos.security.certs import certificate_info, make_csr
from edgeos.security.keys import generate_key, load_private_key, write_private_key
from edgeos.security.tls import fetch_ca
from edgeos.security.tokens import parse_token, pin_of
from edgeos.state.ids import new_id
from edgeos.sync.client import fleet_client, parse_answer, transport_error
from edgeos.sync.identity import FleetPaths, Identity, save_identity

log = logging.getLogger("edgeos.sync")


def enroll(
    data_dir: Path, fleet_url: str, join_token: str, inventory: Inventory, *, timeout: float = 30.0
) -> Identity:
    """Enroll this node with the fleet at ``fleet_url``; returns the saved identity.

    AuthenticationError carries the fleet's reason for a refused token; VerificationError
    a CA that does not match the token's pin or an answer that does not fit the request;
    UnavailableError (retryable) a fleet that does not answer.
    """
    paths = FleetPaths.of(data_dir)
    base = fleet_url.rstrip("/")
    _, pin = parse_token(join_token)
    ca_pem = fetch_ca(base, pin, timeout=timeout)
    key, device_id = device_key(paths)
    request = EnrollRequest(
        join_token=join_token,
        device_id=device_id,
        csr_pem=make_csr(key, device_id),
        inventory=inventory,
    )
    with fleet_client(base, ca_pem, timeout=timeout) as http:
        try:
            response = http.post(
                f"{API}/enroll",
                content=request.model_dump_json(),
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise transport_error(exc, base, "the enrollment") from exc
    try:
        answer = parse_answer(response, EnrollResponse, "the enrollment")
    except ConflictError:
        # Enrolled already: the node stopped after the fleet answered but before it had
        # saved everything. What it saved is enough when it names this device and key.
        resumed = _resume(paths, data_dir, base, key, device_id, pin)
        if resumed is None:
            raise
        return resumed
    _check_answer(answer, device_id, key, pin)
    if paths.ca.exists() and pin_of(paths.ca.read_text()) != pin:
        # Another fleet's TUF root must not stay trusted.
        shutil.rmtree(paths.tuf_metadata, ignore_errors=True)
    write_atomic(paths.cert, answer.certificate_pem.encode(), 0o644)
    write_atomic(paths.ca, ca_pem.encode(), 0o644)
    bootstrap_tuf(paths, base, ca_pem, answer.tuf_root.encode())
    info = certificate_info(answer.certificate_pem)
    identity = Identity(
        url=base, device_id=device_id, group=answer.group, enrolled_at=time.time(),
        certificate_not_before=info.not_before, certificate_not_after=info.not_after,
    )  # fmt: skip
    save_identity(data_dir, identity)
    log.info("enrolled with %s as device %s in group %s", base, device_id, answer.group)
    return identity


def token_due(
    token: str | None, paths: FleetPaths, identity: Identity | None, refused: bool
) -> bool:
    """Whether to enroll with ``token`` now: not enrolled yet, refused by the fleet
    (revoked, expired certificate), or a token of another fleet (its pin names another CA)."""
    if token is None:
        return False
    if identity is None or refused:
        return True
    with contextlib.suppress(ConfigError, VerificationError, AuthenticationError, OSError):
        return parse_token(token)[1] != pin_of(paths.ca.read_text())
    return False


def device_key(paths: FleetPaths) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """The device's key and id: the saved ones, or new ones saved before they are used."""
    try:
        device_id = paths.device_id.read_text().strip()
    except FileNotFoundError:
        device_id = ""
    if not device_id:
        device_id = new_id()
        write_atomic(paths.device_id, device_id.encode() + b"\n", 0o600)
    if paths.key.exists():
        return load_private_key(paths.key), device_id
    key = generate_key()
    write_private_key(paths.key, key)
    return key, device_id


def bootstrap_tuf(paths: FleetPaths, base: str, ca_pem: str, root: bytes) -> None:
    """Trust the TUF root from enrollment, unless a root of this fleet is trusted already."""
    from edgeos.sync.tuf_client import TufClient

    with fleet_client(base, ca_pem) as http:
        TufClient(paths.tuf_metadata, paths.tuf_targets, base, http).bootstrap(root)


def _check_answer(
    answer: EnrollResponse, device_id: str, key: ec.EllipticCurvePrivateKey, pin: str
) -> None:
    """The certificate must be for this device and key, issued by the pinned CA."""
    if answer.device_id != device_id:
        raise VerificationError(
            f"the fleet enrolled device {answer.device_id}, but this node asked as {device_id}"
        )
    if pin_of(answer.ca_pem) != pin:
        raise VerificationError(
            "the fleet's enrollment answer names a CA other than the pinned one"
        )
    _check_certificate(answer.certificate_pem, answer.ca_pem, device_id, key)


def _check_certificate(
    cert_pem: str, ca_pem: str, device_id: str, key: ec.EllipticCurvePrivateKey
) -> None:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
    except ValueError as exc:
        raise VerificationError("the fleet sent a certificate that does not parse") from exc
    if certificate_info(cert_pem).device_id != device_id:
        raise VerificationError(f"the fleet's certificate is not for device {device_id}")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or (
        public.public_numbers() != key.public_key().public_numbers()
    ):
        raise VerificationError("the fleet's certificate is not for this node's key")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise VerificationError("the fleet's certificate was not issued by its CA") from exc


def _resume(
    paths: FleetPaths,
    data_dir: Path,
    base: str,
    key: ec.EllipticCurvePrivateKey,
    device_id: str,
    pin: str,
) -> Identity | None:
    """The identity from files an interrupted enrollment saved, or None if they do not add up."""
    with contextlib.suppress(OSError, ConfigError, VerificationError):
        cert_pem, ca_pem = paths.cert.read_text(), paths.ca.read_text()
        if pin_of(ca_pem) != pin or not (paths.tuf_metadata / "root.json").is_file():
            return None
        _check_certificate(cert_pem, ca_pem, device_id, key)
        info = certificate_info(cert_pem)
        if info.not_after <= time.time():
            return None
        identity = Identity(
            url=base, device_id=device_id, group=info.group, enrolled_at=time.time(),
            certificate_not_before=info.not_before, certificate_not_after=info.not_after,
        )  # fmt: skip
        save_identity(data_dir, identity)
        log.info("completed an interrupted enrollment as device %s", device_id)
        return identity
    return None


def renewal_csr(data_dir: Path, identity: Identity) -> str:
    """A CSR for the same device id and key, to renew the certificate during sync."""
    return make_csr(load_private_key(FleetPaths.of(data_dir).key), identity.device_id)


def install_certificate(data_dir: Path, identity: Identity, cert_pem: str) -> Identity:
    """Check a renewed certificate (this device, this key, the fleet's CA) and save it
    atomically; returns the identity with the new validity."""
    paths = FleetPaths.of(data_dir)
    key = load_private_key(paths.key)
    _check_certificate(cert_pem, paths.ca.read_text(), identity.device_id, key)
    info = certificate_info(cert_pem)
    write_atomic(paths.cert, cert_pem.encode(), 0o644)
    renewed = Identity(
        url=identity.url, device_id=identity.device_id, group=info.group or identity.group,
        enrolled_at=identity.enrolled_at,
        certificate_not_before=info.not_before, certificate_not_after=info.not_after,
    )  # fmt: skip
    save_identity(data_dir, renewed)
    return renewed
