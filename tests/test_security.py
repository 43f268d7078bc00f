"""edgeos.security with real keys, real certificates and real TLS over loopback."""

from __future__ import annotations

import hashlib
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from edgeos.errors import (
    AuthenticationError,
    ConfigError,
    UnavailableError,
    VerificationError,
)
from edgeos.security import (
    CertificateAuthority,
    certificate_info,
    client_ssl_context,
    fetch_ca,
    format_token,
    generate_key,
    hash_secret,
    load_private_key,
    make_csr,
    new_secret,
    parse_token,
    peer_certificate,
    pin_of,
    same,
    uvicorn_ssl_options,
    write_private_key,
    write_public_file,
)
from edgeos.security.tls import tls_extension
from tests.loopback import UvicornThread

DEVICE = "0190f1e2-7c3a-7def-8a12-3456789abcde"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    # Same default name as ``ca``: only the signature tells the two apart.
    return CertificateAuthority.create()


def der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# Keys and files


def test_private_keys_are_written_owner_only_in_owner_only_directories(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "a" / "b" / "device.key"
    write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert load_private_key(path).private_numbers() == key.private_numbers()
    assert [p.name for p in path.parent.iterdir()] == ["device.key"]  # no temp file left

    write_public_file(path.parent / "device.crt", "PEM")
    assert stat.S_IMODE((path.parent / "device.crt").stat().st_mode) == 0o644


def test_a_missing_or_foreign_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.key"):
        load_private_key(tmp_path / "absent.key")
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    with pytest.raises(ConfigError, match=r"junk\.key"):
        load_private_key(junk)


# The CA


def test_the_ca_round_trips_through_its_files_with_a_stable_pin(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    ca.save(tmp_path / "keys" / "ca.key", tmp_path / "keys" / "ca.crt")
    assert stat.S_IMODE((tmp_path / "keys" / "ca.key").stat().st_mode) == 0o600
    loaded = CertificateAuthority.load(tmp_path / "keys" / "ca.key", tmp_path / "keys" / "ca.crt")
    assert loaded.pin == ca.pin == pin_of(ca.cert_pem)
    assert loaded.pin == hashlib.sha256(der(ca.cert_pem)).hexdigest()
    assert loaded.cert_pem == ca.cert_pem

    cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    assert constraints.path_length == 0

    # A loaded CA issues certificates the original accepts: same key, same subject.
    issued = loaded.issue_device(make_csr(generate_key(), DEVICE), device_id=DEVICE, group="g")
    assert ca.verify_device(issued.pem).device_id == DEVICE


def test_a_ca_key_that_does_not_match_its_certificate_is_refused(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    ca.save(tmp_path / "ca.key", tmp_path / "ca.crt")
    other_ca.save(tmp_path / "other.key", tmp_path / "other.crt")
    with pytest.raises(ConfigError, match=r"other\.key"):
        CertificateAuthority.load(tmp_path / "other.key", tmp_path / "ca.crt")


# Device certificates


def test_a_device_certificate_says_who_and_where_the_device_is(ca: CertificateAuthority) -> None:
    key = generate_key()
    issued = ca.issue_device(make_csr(key, DEVICE), device_id=DEVICE, group="stores")
    seen = ca.verify_device(issued.pem)
    assert (seen.device_id, seen.group, seen.serial) == (DEVICE, "stores", issued.serial)
    assert seen.not_after == issued.not_after
    assert seen.not_after - time.time() == pytest.approx(24 * 3600, abs=60)
    assert time.time() - seen.not_before == pytest.approx(300, abs=60)  # clock skew allowance
    assert issued.serial == issued.serial.lower()
    assert ca.verify_device(der(issued.pem)) == seen  # DER, as TLS hands it over
    assert certificate_info(issued.pem) == seen

    cert = x509.load_pem_x509_certificate(issued.pem.encode())
    assert cert.public_key() == key.public_key()
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_serials_are_random_and_distinct(ca: CertificateAuthority) -> None:
    csr = make_csr(generate_key(), DEVICE)
    serials = {ca.issue_device(csr, device_id=DEVICE, group="g").serial for _ in range(5)}
    assert len(serials) == 5


def test_a_csr_for_another_device_is_refused(ca: CertificateAuthority) -> None:
    csr = make_csr(generate_key(), "device-aaaaaaaa")
    with pytest.raises(VerificationError, match=r"device-aaaaaaaa.*device-bbbbbbbb"):
        ca.issue_device(csr, device_id="device-bbbbbbbb", group="g")


def test_a_csr_whose_signature_does_not_hold_is_refused(ca: CertificateAuthority) -> None:
    csr = x509.load_pem_x509_csr(make_csr(generate_key(), "device-aaaaaaaa").encode())
    # Someone rewrote the subject of a CSR signed for another device.
    forged = csr.public_bytes(serialization.Encoding.DER).replace(
        b"device-aaaaaaaa", b"device-bbbbbbbb"
    )
    forged_pem = x509.load_der_x509_csr(forged).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(VerificationError, match="signature"):
        ca.issue_device(forged_pem, device_id="device-bbbbbbbb", group="g")
    with pytest.raises(VerificationError, match="not a PEM"):
        ca.issue_device("garbage", device_id=DEVICE, group="g")


def test_a_certificate_from_another_ca_is_refused(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    issued = other_ca.issue_device(make_csr(generate_key(), DEVICE), device_id=DEVICE, group="g")
    with pytest.raises(AuthenticationError, match="not issued by this fleet's CA"):
        ca.verify_device(issued.pem)


def test_an_expired_or_not_yet_valid_certificate_is_refused(ca: CertificateAuthority) -> None:
    issued = ca.issue_device(
        make_csr(generate_key(), DEVICE), device_id=DEVICE, group="g", validity=timedelta(hours=1)
    )
    info = certificate_info(issued.pem)
    assert ca.verify_device(issued.pem, now=info.not_after - 1).device_id == DEVICE
    with pytest.raises(AuthenticationError, match=r"expired at 20\d\d-.*enrolling again"):
        ca.verify_device(issued.pem, now=info.not_after + 1)
    with pytest.raises(AuthenticationError, match="not valid before"):
        ca.verify_device(issued.pem, now=info.not_before - 1)


def test_a_tampered_certificate_is_refused(ca: CertificateAuthority) -> None:
    issued = ca.issue_device(make_csr(generate_key(), DEVICE), device_id=DEVICE, group="g")
    data = der(issued.pem)
    with pytest.raises(AuthenticationError, match="not issued by this fleet's CA"):
        ca.verify_device(flip(data, len(data) - 1))  # in the signature
    promoted = data.replace(b"\x0c\x01g", b"\x0c\x01h")  # OU "g" becomes "h"
    assert promoted != data
    with pytest.raises(AuthenticationError, match="not issued by this fleet's CA"):
        ca.verify_device(promoted)
    with pytest.raises(AuthenticationError, match="cannot be parsed"):
        ca.verify_device(b"\x30\x03junk")


def test_certificates_that_are_not_device_certificates_are_refused(
    ca: CertificateAuthority,
) -> None:
    with pytest.raises(AuthenticationError, match="not a device"):
        ca.verify_device(ca.cert_pem)  # the CA's own, self-signed
    server = ca.issue_server(generate_key(), ["127.0.0.1"])
    with pytest.raises(AuthenticationError, match="not a device"):
        ca.verify_device(server)


def test_no_certificate_outlives_its_ca() -> None:
    short = CertificateAuthority.create(days=1)
    issued = short.issue_device(
        make_csr(generate_key(), DEVICE), device_id=DEVICE, group="g", validity=timedelta(days=30)
    )
    assert issued.not_after <= short.not_after


# Tokens


def test_tokens_carry_a_secret_and_the_ca_pin(ca: CertificateAuthority) -> None:
    secret = new_secret()
    assert len(secret) == 43
    token = format_token(secret, ca.pin)
    assert parse_token(token) == (secret, ca.pin)
    assert parse_token(f"  {secret}.{ca.pin.upper()}\n") == (secret, ca.pin)
    assert hash_secret("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert hash_secret(secret) == hash_secret(secret) != hash_secret(new_secret())
    assert same(hash_secret(secret), hash_secret(secret))
    assert not same(ca.pin, "0" * 64)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "justasecretwithoutanydot",
        "s3cr3t-s3cr3t-s3cr3t.abc",
        "s3cr3t-s3cr3t-s3cr3t." + "g" * 64,
    ],
)
def test_a_malformed_token_is_refused_without_being_echoed(token: str) -> None:
    with pytest.raises(AuthenticationError, match=r"expected SECRET\.CAPIN") as caught:
        parse_token(token)
    if token:
        assert token not in str(caught.value)


# TLS over loopback


@dataclass
class Fleet:
    url: str
    ca: CertificateAuthority
    keys: Path


async def whoami(request: Request) -> PlainTextResponse:
    pem = peer_certificate(request.scope)
    return PlainTextResponse(certificate_info(pem).device_id if pem else "none")


async def tls_details(request: Request) -> JSONResponse:
    return JSONResponse(request.scope["extensions"]["tls"])


@pytest.fixture(scope="module")
def fleet(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    keys = tmp_path_factory.mktemp("fleet") / "keys"
    ca.save(keys / "ca.key", keys / "ca.crt")
    server_key = generate_key()
    write_private_key(keys / "server.key", server_key)
    write_public_file(keys / "server.crt", ca.issue_server(server_key, ["127.0.0.1", "localhost"]))

    async def ca_pem(request: Request) -> PlainTextResponse:
        return PlainTextResponse(ca.cert_pem)

    routes = [Route("/whoami", whoami), Route("/tls", tls_details), Route("/api/v1/ca", ca_pem)]
    app = Starlette(routes=routes)
    options = uvicorn_ssl_options(keys / "server.key", keys / "server.crt", keys / "ca.crt")
    config = uvicorn.Config(app, log_level="critical", lifespan="off", **options)
    # A socket bound here, not a port number: no race with another test for the port.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    served = UvicornThread(config, sockets=[sock], name="fleet")
    try:
        yield Fleet(f"https://127.0.0.1:{port}", ca, keys)
    finally:
        served.stop()
        sock.close()
    assert not served.alive


def device_files(ca: CertificateAuthority, directory: Path, device_id: str) -> tuple[Path, Path]:
    key = generate_key()
    issued = ca.issue_device(make_csr(key, device_id), device_id=device_id, group="stores")
    write_private_key(directory / f"{device_id}.key", key)
    write_public_file(directory / f"{device_id}.crt", issued.pem)
    return directory / f"{device_id}.crt", directory / f"{device_id}.key"


def get(url: str, context: ssl.SSLContext) -> httpx.Response:
    with httpx.Client(verify=context, timeout=5) as client:
        return client.get(url)


def test_a_device_certificate_reaches_the_app(fleet: Fleet, tmp_path: Path) -> None:
    cert, key = device_files(fleet.ca, tmp_path, DEVICE)
    context = client_ssl_context(fleet.ca.cert_pem, cert, key)
    with httpx.Client(verify=context, timeout=5) as client:
        # Twice on one connection: every request of it carries the certificate.
        assert client.get(f"{fleet.url}/whoami").text == DEVICE
        assert client.get(f"{fleet.url}/whoami").text == DEVICE
        tls = client.get(f"{fleet.url}/tls").json()
    # The ASGI TLS extension as the spec has it.
    assert tls["client_cert_name"] == f"OU=stores,CN={DEVICE}"
    assert tls["client_cert_chain"] == [cert.read_text()]
    assert tls["tls_version"] in (0x0303, 0x0304)
    assert tls["client_cert_error"] is None


def test_a_client_without_a_certificate_is_let_in_anonymously(fleet: Fleet) -> None:
    response = get(f"{fleet.url}/whoami", client_ssl_context(fleet.ca.cert_pem))
    assert response.text == "none"
    tls = get(f"{fleet.url}/tls", client_ssl_context(fleet.ca.cert_pem)).json()
    assert (tls["client_cert_chain"], tls["client_cert_name"]) == ([], None)


def test_a_certificate_from_another_ca_fails_the_handshake(
    fleet: Fleet, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    cert, key = device_files(other_ca, tmp_path, DEVICE)
    context = client_ssl_context(fleet.ca.cert_pem, cert, key)
    # With TLS 1.3 the client's handshake is over before the server judges its certificate:
    # the server then hangs up, and the client learns it on its first read, not in connect.
    with pytest.raises(httpx.TransportError):
        get(f"{fleet.url}/whoami", context)


def test_a_client_that_does_not_trust_the_fleet_ca_refuses_the_server(
    fleet: Fleet, other_ca: CertificateAuthority
) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        get(f"{fleet.url}/whoami", client_ssl_context(other_ca.cert_pem))


def test_fetch_ca_accepts_the_pinned_ca_only(fleet: Fleet, other_ca: CertificateAuthority) -> None:
    assert fetch_ca(fleet.url + "/", fleet.ca.pin) == fleet.ca.cert_pem
    with pytest.raises(VerificationError, match="man in the middle") as caught:
        fetch_ca(fleet.url, other_ca.pin)
    assert other_ca.pin[:12] in str(caught.value)
    assert fleet.ca.pin[:12] in str(caught.value)


def test_fetch_ca_from_nowhere_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UnavailableError) as caught:
        fetch_ca(f"https://127.0.0.1:{port}", "0" * 64, timeout=2)
    assert caught.value.retryable
    with pytest.raises(ConfigError, match="https://"):
        fetch_ca(f"http://127.0.0.1:{port}", "0" * 64)


def test_tls_options_refuse_missing_files_and_half_client_identities(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.key"):
        uvicorn_ssl_options(tmp_path / "server.key", tmp_path / "server.crt", tmp_path / "ca.crt")
    with pytest.raises(ConfigError, match="both"):
        client_ssl_context("irrelevant", tmp_path / "device.crt")
    assert tls_extension(None) is None
    assert peer_certificate({"type": "http"}) is None
