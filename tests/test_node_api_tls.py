"""The node's API over HTTPS (``tls_cert_file``, ``tls_key_file``): tokens never cross
the network in the clear. A real node process with a certificate from a CA made here for
a store gateway's name and its loopback address."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from typer.testing import CliRunner

from edgeos.cli.main import app
from edgeos.errors import ConfigError, UnavailableError
from edgeos.node.api_tls import uvicorn_options
from edgeos.node.process import ServerProcess, node_process
from edgeos.security.certs import CertificateAuthority, make_csr
from edgeos.security.keys import generate_key, load_private_key, write_private_key
from edgeos.security.tls import client_ssl_context, pinned_context
from edgeos.settings import load_settings

runner = CliRunner()


def certificate(tmp_path: Path, hosts: list[str]) -> tuple[Path, Path, CertificateAuthority]:
    """A server certificate and key for ``hosts``, signed by a new CA (also returned)."""
    ca = CertificateAuthority.create("store CA")
    key = generate_key()
    cert_path, key_path = tmp_path / "api.crt", tmp_path / "api.key"
    write_private_key(key_path, key)
    cert_path.write_text(ca.issue_server(key, hosts) + ca.cert_pem)  # leaf, then its CA
    return cert_path, key_path, ca


def configure(data: Path, **settings: object) -> None:
    data.mkdir(parents=True, exist_ok=True)
    (data / "node.yaml").write_text(yaml.safe_dump({k: str(v) for k, v in settings.items()}))


def test_the_api_serves_https_and_tokens_travel_inside_it(tmp_path: Path) -> None:
    cert, key, ca = certificate(tmp_path, ["gateway.store.example", "127.0.0.1"])
    data = tmp_path / "node"
    configure(data, tls_cert_file=cert, tls_key_file=key)
    trust = client_ssl_context(ca.cert_pem)
    with node_process(data, https=trust) as node:
        assert node.url.startswith("https://")
        with node.client() as client:
            assert client.get("/api/status").status_code == 200
            assert client.get("/api/status", headers={"Authorization": ""}).status_code == 401
        # A client that does not trust the store's CA does not get to send its token.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{node.url}/api/status", headers=node.headers)
        # Plain HTTP to the same port gets no answer from the API.
        with pytest.raises(httpx.HTTPError):
            httpx.get(node.url.replace("https://", "http://") + "/v2/health/live", timeout=5)
        # The CLI on the device reaches its node on loopback, trusting its certificate.
        port = node.url.rsplit(":", 1)[1]
        shown = runner.invoke(
            app, ["node", "status", "--data-dir", str(data)],
            env={"COLUMNS": "200", "EDGEOS_PORT": port},
        )  # fmt: skip
        assert shown.exit_code == 0, shown.output
        assert f"API at https://127.0.0.1:{port}" in shown.output


def test_the_cli_pins_the_nodes_own_certificate_not_its_ca(tmp_path: Path) -> None:
    # Another certificate of the same CA, for the same names: the CLI must not take it.
    cert, key, ca = certificate(tmp_path, ["127.0.0.1"])
    impostor_key = generate_key()
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    write_private_key(impostor / "api.key", impostor_key)
    (impostor / "api.crt").write_text(ca.issue_server(impostor_key, ["127.0.0.1"]))
    data = tmp_path / "node"
    configure(data, tls_cert_file=impostor / "api.crt", tls_key_file=impostor / "api.key")
    with node_process(data, https=client_ssl_context(ca.cert_pem)) as node:
        port = node.url.rsplit(":", 1)[1]
        # The CLI is told the node's certificate is cert, but the node serves the impostor.
        shown = runner.invoke(
            app, ["node", "status", "--data-dir", str(data)],
            env={"COLUMNS": "200", "EDGEOS_PORT": port, "EDGEOS_TLS_CERT_FILE": str(cert),
                 "EDGEOS_TLS_KEY_FILE": str(key)},
        )  # fmt: skip
    # Refused: no answer counts as "not running", and the database is read instead.
    assert "node not running" in shown.output


def test_bad_tls_settings_are_refused_naming_what_is_wrong(tmp_path: Path) -> None:
    cert, _, _ = certificate(tmp_path, ["127.0.0.1"])
    with pytest.raises(ConfigError, match="tls_cert_file is set without tls_key_file"):
        load_settings({"data_dir": tmp_path / "a", "tls_cert_file": cert})
    with pytest.raises(ConfigError, match=r"tls_key_file = .*nope\.key.*: no such file"):
        load_settings({"data_dir": tmp_path / "a", "tls_cert_file": cert,
                       "tls_key_file": tmp_path / "nope.key"})  # fmt: skip
    # A key that is not the certificate's: the node does not start, and says why.
    (tmp_path / "other").mkdir()
    _, other_key, _ = certificate(tmp_path / "other", ["127.0.0.1"])
    data = tmp_path / "node"
    configure(data, tls_cert_file=cert, tls_key_file=other_key)
    node = node_process(data, https=ssl.create_default_context())
    node.startup_timeout = 20
    with pytest.raises(UnavailableError) as failed, node:
        pass
    assert "cannot serve HTTPS with tls_cert_file" in str(failed.value)
    assert not (data / "node.db").exists()  # refused before anything was written


def test_a_node_open_to_the_network_without_https_says_so(tmp_path: Path) -> None:
    data = tmp_path / "node"
    data.mkdir()
    with node_process(data, host="0.0.0.0") as node:
        node.stop()
        log = node.log()
    assert "API tokens cross the network in the clear" in log


# --- Client certificates (tls_client_ca_file, tls_client_crl_file) ---


def lan_address() -> str | None:
    """An address of this machine that is not loopback (the one its default route leaves
    by; no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


def wait_for_log(node: ServerProcess, text: str, timeout: float = 10.0) -> str:
    """The node's output once it holds ``text``."""
    deadline = time.monotonic() + timeout
    while text not in (log := node.log()):
        assert time.monotonic() < deadline, f"the node did not log {text!r}:\n{log}"
        time.sleep(0.05)
    return log


class Clients:
    """A CA for the API's callers, saved under ``root``; it issues their certificates."""

    def __init__(self, root: Path, name: str = "store clients CA") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.ca = CertificateAuthority.create(name)
        self.ca_file, key_file = root / "ca.crt", root / "ca.key"
        self.ca.save(key_file, self.ca_file)
        self.key = load_private_key(key_file)

    def issue(self, name: str) -> tuple[Path, Path, int]:
        """A client certificate and key for ``name`` (files), and its serial number."""
        key = generate_key()
        issued = self.ca.issue_device(make_csr(key, name), device_id=name, group="tills")
        cert_path, key_path = self.root / f"{name}.crt", self.root / f"{name}.key"
        cert_path.write_text(issued.pem)
        write_private_key(key_path, key)
        return cert_path, key_path, int(issued.serial, 16)

    def revocation_list(self, serials: list[int], *, valid: timedelta = timedelta(days=7)) -> Path:
        """A CRL of this CA revoking ``serials``, valid (or, negative, expired) ``valid``."""
        now = datetime.now(UTC)
        issuer = x509.load_pem_x509_certificate(self.ca.cert_pem.encode()).subject
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer)
            .last_update(min(now, now + valid) - timedelta(hours=1))
            .next_update(now + valid)
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        path = self.root / "clients.crl"
        path.write_bytes(builder.sign(self.key, hashes.SHA256()).public_bytes(Encoding.PEM))
        return path


def test_callers_off_the_device_need_a_client_certificate_and_a_token(tmp_path: Path) -> None:
    address = lan_address()
    if address is None:
        pytest.skip("this machine has no address but loopback to call the node from")
    cert, key, _ = certificate(tmp_path, [address, "127.0.0.1"])
    clients = Clients(tmp_path / "clients")
    till_cert, till_key, _ = clients.issue("till-1")
    strangers = Clients(tmp_path / "strangers", "another CA")
    stranger_cert, stranger_key, _ = strangers.issue("till-1")
    data = tmp_path / "node"
    configure(data, tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=clients.ca_file)
    with node_process(data, host="0.0.0.0", https=pinned_context(cert)) as node:
        port = node.url.rsplit(":", 1)[1]
        ca = ssl_ca(cert)

        def get(path: str, *, cert: tuple[Path, Path] | None = None, token: bool = True,
                to: str = "127.0.0.1", source: str | None = address) -> httpx.Response:  # fmt: skip
            """A call to the node at ``to`` from ``source``: by default from the LAN address
            to loopback, which the node sees as a caller off the device does (from an
            address that is neither loopback nor the one called)."""
            trust = client_ssl_context(ca, *(cert or (None, None)))
            transport = httpx.HTTPTransport(verify=trust, local_address=source)
            with httpx.Client(transport=transport, timeout=10) as client:
                headers = node.headers if token else {}
                return client.get(f"https://{to}:{port}{path}", headers=headers)

        # Off the device: certificate and token, or nothing.
        assert get("/api/status", cert=(till_cert, till_key)).status_code == 200
        refused = get("/api/status")
        assert refused.status_code == 401
        assert "client certificate" in refused.json()["error"]
        assert get("/api/status", cert=(till_cert, till_key), token=False).status_code == 401
        v1 = get("/v1/models")
        assert v1.status_code == 401
        assert v1.json()["error"]["code"] == "invalid_api_key"
        # A certificate of another CA does not get through the handshake, and the node
        # says why.
        with pytest.raises(httpx.TransportError):
            get("/api/status", cert=(stranger_cert, stranger_key))
        assert "unable to get local issuer certificate" in wait_for_log(
            node, "refused a caller's client certificate"
        )
        # Health probes stay open, as without certificates.
        assert get("/v2/health/ready", token=False).status_code == 200
        # On the device, the token alone: over loopback, and to the LAN address from it.
        assert get("/api/status", source=None).status_code == 200
        assert get("/api/status", to=address).status_code == 200
        # The CLI (no certificate) calling its node at the LAN address it is set to.
        shown = runner.invoke(
            app, ["node", "status", "--data-dir", str(data)],
            env={"COLUMNS": "200", "EDGEOS_PORT": port, "EDGEOS_HOST": address},
        )  # fmt: skip
        assert shown.exit_code == 0
        assert "node running" in shown.output


def test_a_revoked_client_certificate_is_refused_at_the_handshake(tmp_path: Path) -> None:
    cert, key, _ = certificate(tmp_path, ["127.0.0.1"])
    clients = Clients(tmp_path / "clients")
    kept_cert, kept_key, _ = clients.issue("till-1")
    lost_cert, lost_key, lost_serial = clients.issue("till-2")
    crl = clients.revocation_list([lost_serial])
    data = tmp_path / "node"
    configure(data, tls_cert_file=cert, tls_key_file=key,
              tls_client_ca_file=clients.ca_file, tls_client_crl_file=crl)  # fmt: skip
    with node_process(data, https=pinned_context(cert)) as node:
        ca = ssl_ca(cert)
        kept = httpx.Client(verify=client_ssl_context(ca, kept_cert, kept_key))
        lost = httpx.Client(verify=client_ssl_context(ca, lost_cert, lost_key))
        with kept, lost:
            assert kept.get(node.url + "/api/status", headers=node.headers).status_code == 200
            # Presented, so checked, on loopback too: a revoked certificate gets no answer.
            for _ in range(3):
                with pytest.raises(httpx.TransportError):
                    lost.get(node.url + "/api/status", headers=node.headers)
        # The node says why, once for the three tries (a caller retrying cannot flood it).
        refused = "refused a caller's client certificate at the TLS handshake: "
        log = wait_for_log(node, refused)
        assert f"{refused}certificate revoked" in log
        assert log.count(refused) == 1


def test_bad_client_certificate_settings_are_refused_naming_the_file(tmp_path: Path) -> None:
    cert, key, _ = certificate(tmp_path, ["127.0.0.1"])
    clients = Clients(tmp_path / "clients")
    base = {"data_dir": tmp_path / "a", "tls_cert_file": cert, "tls_key_file": key}
    with pytest.raises(ConfigError, match="tls_client_ca_file is set without tls_cert_file"):
        load_settings({"data_dir": tmp_path / "a", "tls_client_ca_file": clients.ca_file})
    with pytest.raises(ConfigError, match="tls_client_crl_file is set without tls_client_ca"):
        load_settings({**base, "tls_client_crl_file": clients.revocation_list([])})
    with pytest.raises(ConfigError, match=r"tls_client_ca_file = .*nope\.crt.*: no such file"):
        load_settings({**base, "tls_client_ca_file": tmp_path / "nope.crt"})
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"cannot use tls_client_ca_file .*ca\.txt as a CA"):
        uvicorn_options(load_settings({**base, "tls_client_ca_file": not_pem}))
    # A list of another CA, or one past its next update, would refuse every caller.
    others = Clients(tmp_path / "others", "another CA")
    foreign = load_settings({**base, "tls_client_ca_file": clients.ca_file,
                             "tls_client_crl_file": others.revocation_list([])})  # fmt: skip
    with pytest.raises(ConfigError, match="is not signed by the CA of tls_client_ca_file"):
        uvicorn_options(foreign)
    stale = load_settings({**base, "tls_client_ca_file": clients.ca_file,
                           "tls_client_crl_file": clients.revocation_list(
                               [], valid=-timedelta(days=1))})  # fmt: skip
    with pytest.raises(ConfigError, match=r"clients\.crl expired on .*publish a new one"):
        uvicorn_options(stale)
    good = load_settings({**base, "tls_client_ca_file": clients.ca_file,
                          "tls_client_crl_file": clients.revocation_list([])})  # fmt: skip
    options = uvicorn_options(good)
    assert options["ssl_cert_reqs"] == ssl.CERT_OPTIONAL
    assert options["ssl_ca_certs"] == str(clients.ca_file)


def ssl_ca(cert: Path) -> str:
    """The CA certificate at the end of a server certificate file (leaf, then its CA)."""
    text = cert.read_text()
    start = text.index("-----BEGIN CERTIFICATE-----", 1)
    return text[start:]
