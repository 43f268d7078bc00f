"""``edgeos fleet ...`` against a real TLS fleet, on SQLite and PostgreSQL.

``fleet serve`` runs as a child process on a fresh data directory; the operator commands
run in-process (Typer's runner) against a fleet served from a thread.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from edgeos.cli.main import app
from edgeos.errors import AuthenticationError, ConfigError, PermissionDeniedError
from edgeos.fleet.client import FleetClient
from edgeos.fleet.keystore import init_fleet
from edgeos.security.tls import client_ssl_context
from tests.fleet_support import (
    FleetServer,
    enroll_device,
    fleet_config,
    free_port,
    join_token,
    policy_file,
)

runner = CliRunner()


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private login file, no login in the environment, and a wide console."""
    path = tmp_path / "config" / "fleet.json"
    monkeypatch.setenv("EDGEOS_FLEET_CONFIG", str(path))
    monkeypatch.delenv("EDGEOS_FLEET_URL", raising=False)
    monkeypatch.delenv("EDGEOS_FLEET_TOKEN", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # the console reads it at each print
    return path


def fleet(*args: str) -> str:
    """Run ``edgeos fleet ARGS``; the output, or the command's own error raised."""
    result = runner.invoke(app, ["fleet", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def login(server: FleetServer, token: str | None = None) -> None:
    fleet("login", server.url, "--token", token or server.admin_token)


def test_login_pins_the_ca_and_stores_the_login_privately(
    running_fleet: FleetServer, cli_env: Path
) -> None:
    out = fleet("login", running_fleet.url, "--token", running_fleet.admin_token)
    assert "as admin (admin, deploy, read)" in out
    stored = json.loads(cli_env.read_text())
    assert stored["ca_pem"] == running_fleet.ca_pem
    assert stat.S_IMODE(cli_env.stat().st_mode) == 0o600
    # A token whose pin names another CA is refused before any secret is sent.
    wrong = running_fleet.admin_token.rpartition(".")[0] + "." + "0" * 64
    with pytest.raises(Exception, match="man in the middle"):
        fleet("login", running_fleet.url, "--token", wrong)


def test_tokens_and_join_tokens(
    running_fleet: FleetServer, cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    login(running_fleet)
    out = fleet("token", "create", "ci", "--scope", "read")
    ci_token = out.strip().splitlines()[-1]
    listed = json.loads(fleet("token", "list", "--json"))
    ci = next(t for t in listed if t["name"] == "ci")
    assert ci["scopes"] == ["read"]
    assert "ci" in fleet("token", "list")

    # The environment overrides the stored login: now as the read-only token.
    monkeypatch.setenv("EDGEOS_FLEET_TOKEN", ci_token)
    with pytest.raises(PermissionDeniedError):
        fleet("join-token", "create", "--group", "stores")
    monkeypatch.delenv("EDGEOS_FLEET_TOKEN")

    out = fleet("join-token", "create", "--group", "stores", "--ttl", "10m", "--uses", "2")
    assert "2 use(s)" in out
    with pytest.raises(ConfigError, match="--ttl"):
        fleet("join-token", "create", "--group", "stores", "--ttl", "soon")
    fleet("token", "revoke", ci["id"])
    with (
        FleetClient(running_fleet.url, ci_token, running_fleet.ca_pem) as revoked,
        pytest.raises(AuthenticationError),
    ):
        revoked.whoami()


def test_devices_list_show_label_revoke(
    running_fleet: FleetServer, cli_env: Path, tmp_path: Path
) -> None:
    login(running_fleet)
    token = fleet("join-token", "create", "--group", "stores").strip().splitlines()[-1]
    device = enroll_device(running_fleet, token, tmp_path)
    other = enroll_device(running_fleet, join_token(running_fleet, "lab"), tmp_path)

    assert device.device_id in fleet("devices", "list")
    only = json.loads(fleet("devices", "list", "--group", "stores", "--json"))
    assert [d["id"] for d in only] == [device.device_id]

    out = fleet("devices", "label", device.device_id, "zone=north", "tier=gold")
    assert "tier=gold, zone=north" in out
    assert "zone=north" in fleet("devices", "label", device.device_id, "--remove", "tier")
    labelled = json.loads(fleet("devices", "list", "--label", "zone=north", "--json"))
    assert [d["id"] for d in labelled] == [device.device_id]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        fleet("devices", "label", device.device_id, "oops")

    shown = fleet("devices", "show", device.device_id)
    assert "group stores, active" in shown
    assert "zone=north" in shown
    assert "test-device" in shown

    fleet("devices", "revoke", device.device_id)
    assert device.sync().status_code == 401
    assert other.sync().status_code == 200
    revoked = json.loads(fleet("devices", "list", "--status", "revoked", "--json"))
    assert [d["id"] for d in revoked] == [device.device_id]
    audit = json.loads(fleet("audit", "--json", "--limit", "500"))
    assert {"device.revoke", "device.label", "join-token.create"} <= {r["action"] for r in audit}
    assert "device.revoke" in fleet("audit")
    device.close()
    other.close()


def test_publish_policy_and_read_it_back(
    running_fleet: FleetServer, cli_env: Path, tmp_path: Path
) -> None:
    login(running_fleet)
    path = policy_file(tmp_path, "stores", "3")
    out = fleet("publish", "policy", str(path))
    assert "published policy/stores@3: policies/stores/3.yaml" in out
    with running_fleet.client() as admin:
        assert [a["target"] for a in admin.artifacts()] == ["policies/stores/3.yaml"]
    with pytest.raises(ConfigError, match=r"no agent\.yaml"):
        fleet("publish", "agent", str(tmp_path))


def test_commands_without_a_login_say_how_to_log_in(cli_env: Path) -> None:
    with pytest.raises(ConfigError, match="edgeos fleet login"):
        fleet("devices", "list")


def test_init_twice_makes_one_admin_token(tmp_path: Path, fleet_db_url: str) -> None:
    config = fleet_config(tmp_path / "data", fleet_db_url)
    first = init_fleet(config, root_keys=3, threshold=2)
    assert first.admin_token is not None
    assert stat.S_IMODE(config.admin_token_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in config.root_keys_dir.iterdir()) == [
        "root-1.key", "root-2.key", "root-3.key",
    ]  # fmt: skip
    again = init_fleet(config)
    assert again.admin_token is None
    assert again.created == ()
    # A data directory without the fleet's keys cannot join its database.
    stranger = fleet_config(tmp_path / "elsewhere", fleet_db_url)
    with pytest.raises(ConfigError, match="holds a fleet already"):
        init_fleet(stranger)
    assert not stranger.keys_dir.exists()


def _serve(data: Path, port: int, db_url: str) -> subprocess.Popen[str]:
    """``edgeos fleet serve`` as a child process, once it answers on ``port``."""
    command = [sys.executable, "-m", "edgeos", "fleet", "serve", "--data", str(data),
               "--port", str(port), "--db", db_url, "--san", "fleet.test"]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.communicate()
        ca = data / "keys" / "ca.crt"
        if ca.exists():
            try:
                with httpx.Client(verify=client_ssl_context(ca.read_text())) as http:
                    if http.get(f"{url}/api/v1/health").status_code == 200:
                        return process
            except httpx.TransportError:
                pass
        assert time.monotonic() < deadline, "fleet serve did not come up"
        time.sleep(0.1)


def _stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught, as is customary.
    assert process.returncode in (0, -signal.SIGTERM), err
    return out, err


def test_fleet_serve_starts_on_a_fresh_data_dir(tmp_path: Path, fleet_db_url: str) -> None:
    data, port = tmp_path / "fleet-data", free_port()
    process = _serve(data, port, fleet_db_url)
    try:
        token = (data / "admin-token").read_text().strip()
        with FleetClient.login(f"https://127.0.0.1:{port}", token) as client:
            assert client.whoami()["name"] == "admin"
    finally:
        out, err = _stop(process)
    assert "Application shutdown complete" in err
    assert token in out.splitlines()
    assert "admin token (shown once" in out


def test_sigterm_answers_waiting_long_polls_at_once(tmp_path: Path, fleet_db_url: str) -> None:
    data, port = tmp_path / "fleet-data", free_port()
    process = _serve(data, port, fleet_db_url)
    fleet = FleetServer(fleet_config(data, fleet_db_url, port=port))
    fleet.ca_pem = (data / "keys" / "ca.crt").read_text()
    fleet.admin_token = (data / "admin-token").read_text().strip()
    device = enroll_device(fleet, join_token(fleet), tmp_path / "devices")
    answers: list[httpx.Response] = []
    try:
        first = device.sync().json()
        poll = threading.Thread(
            target=lambda: answers.append(device.sync(revision=first["revision"], wait_s=60))
        )
        poll.start()
        time.sleep(0.5)  # the long poll is now waiting inside the fleet
        stopped = time.monotonic()
        _stop(process)
        poll.join(10)
        took = time.monotonic() - stopped
    finally:
        device.close()
        if process.poll() is None:
            process.kill()
    # The device heard its current state instead of a cut connection, and the replica
    # did not sit out the minute the long poll asked for.
    assert answers, "the long poll got no answer"
    assert answers[0].status_code == 200
    assert answers[0].json()["revision"] == first["revision"]
    assert took < 10
