"""The node's API over HTTPS (``tls_cert_file``, ``tls_key_file``): tokens never cross
the network in the clear. A real node process with a certificate from a CA made here for
a store gateway's name and its loopback address."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from edgeos.cli.main import app
from edgeos.errors import ConfigError, UnavailableError
from edgeos.node.process import node_process
from edgeos.security.certs import CertificateAuthority
from edgeos.security.keys import generate_key, write_private_key
from edgeos.security.tls import client_ssl_context
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
