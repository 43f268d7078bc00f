"""A run that uses a secret end to end leaves no byte of it in the node's files or logs."""

from __future__ import annotations

import base64
import io
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from edgeos.agents import manage
from edgeos.fleet.telemetry_store import decode_batch
from edgeos.node.process import node_process
from edgeos.state import Database
from tests.fleet_support import FleetServer, fleet_config
from tests.stored import stored_bytes
from tests.test_agents import make_bundle
from tests.test_connectors import Receiver

TOKEN = "sk-live-ab12cd34ef56gh78"


def test_a_secret_reaches_the_target_and_nothing_else(tmp_path: Path) -> None:
    receiver = Receiver()
    data = tmp_path / "node"
    data.mkdir()
    try:
        (data / "connectors.yaml").write_text(
            yaml.safe_dump(
                {
                    "supplier": {
                        "type": "http",
                        "base_url": receiver.url,
                        "headers": {"Authorization": "Bearer ${secret:supplier_token}"},
                        "operations": {"reorder": {"method": "POST", "path": "/orders"}},
                    }
                }
            )
        )
        stored = subprocess.run(
            [sys.executable, "-m", "edgeos", "secrets", "set", "supplier_token",
             "--scope", "supplier", "--data-dir", str(data)],
            input=TOKEN, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert stored.returncode == 0, stored.stderr
        with Database(data / "node.db") as db:
            manage.add_agent(
                db, make_bundle(tmp_path), data / "agents", models=[], connectors=["supplier"]
            )
        with node_process(data, EDGEOS_LOG_LEVEL="debug") as node:
            started = httpx.post(
                f"{node.url}/api/agents/inventory/runs", json={"input": {}}, headers=node.headers
            )
            assert started.status_code == 201
            deadline = time.monotonic() + 10
            while not receiver.applied and time.monotonic() < deadline:
                time.sleep(0.05)
            log = node.log()
    finally:
        receiver.stop()
    assert [r.headers.get("Authorization") for r in receiver.requests] == [f"Bearer {TOKEN}"]
    assert TOKEN not in log
    with Database(data / "node.db") as db:
        db.checkpoint()
    for path in data.rglob("*"):
        if path.is_file() and path.name != "vault.key":
            assert TOKEN.encode() not in stored_bytes([path]), f"the secret leaked into {path}"


# -- a secret granted by the fleet ---------------------------------------------------------

GRANTED = "sk-fleet-Zq81wPx3Lm57"


def encodings(secret: str) -> list[bytes]:
    """The secret, its hex, and its base64 at every alignment it can take inside a longer
    encoded text (the characters that depend on neighbours left out)."""
    raw = secret.encode()
    found = [raw, raw.hex().encode(), raw.hex().upper().encode()]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        # Skip the characters mixing the padding in, and the last partial group.
        start = (shift * 8 + 5) // 6 + (1 if shift else 0)
        found.append(encoded[start:-4].rstrip(b"="))
        found.append(base64.urlsafe_b64encode(b"\0" * shift + raw)[start:-4])
    return [f for f in found if len(f) >= 8]


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _vault_names(data: Path) -> set[str]:
    raw = sqlite3.connect(f"file:{data / 'node.db'}?mode=ro", uri=True)
    try:
        return {name for (name,) in raw.execute("SELECT name FROM secrets")}
    finally:
        raw.close()


def test_a_fleet_granted_secret_reaches_the_target_and_nothing_else(tmp_path: Path) -> None:
    """A real fleet grants a secret to a real node, an effect uses it against a loopback
    server, the fleet revokes it; no byte of it (plain, hex, base64) is left in the node's
    files or log, the fleet's database, keys or log, or anything the node reported."""
    fleet_logs = io.StringIO()
    handler = logging.StreamHandler(fleet_logs)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level, root.level = root.level, logging.DEBUG
    receiver = Receiver()
    data = tmp_path / "node"
    data.mkdir()
    fleet = FleetServer(fleet_config(tmp_path / "fleet", f"sqlite:///{tmp_path / 'fleet.db'}"))
    try:
        fleet.start()
        # Every body the node sends the fleet, as the app receives it (past TLS).
        sent = Recorder(fleet.server.config.loaded_app)
        fleet.server.config.loaded_app = sent  # each new connection serves through it
        (data / "connectors.yaml").write_text(
            yaml.safe_dump(
                {
                    "supplier": {
                        "type": "http",
                        "base_url": receiver.url,
                        "scopes": ["orders.write"],
                        "headers": {"Authorization": "Bearer ${secret:supplier_token}"},
                        "operations": {"reorder": {"method": "POST", "path": "/orders"}},
                    }
                }
            )
        )
        with Database(data / "node.db") as db:
            manage.add_agent(
                db, make_bundle(tmp_path), data / "agents", models=[], connectors=["supplier"]
            )
        with fleet.client() as client:
            join = client.create_join_token("stores")["token"]
        process = node_process(
            data,
            EDGEOS_LOG_LEVEL="debug",
            EDGEOS_JOIN_TOKEN=join,
            # Telemetry every second, every trace: what the fleet receives is scanned too.
            EDGEOS_TELEMETRY_INTERVAL_S="1",
            EDGEOS_TELEMETRY_TRACE_PERCENT="100",
        )
        process.command += ["--fleet", fleet.url]
        with process as node, fleet.client() as client:
            _wait(lambda: len(client.devices()) == 1, "the node to enroll")
            device_id = client.devices()[0]["id"]
            grant = client.grant_secret(
                "supplier_token", GRANTED, scopes=["orders.write"], expires_s=3600,
                device=device_id,
            )  # fmt: skip
            _wait(lambda: "supplier_token" in _vault_names(data), "the grant to reach the node")
            started = httpx.post(
                f"{node.url}/api/agents/inventory/runs", json={"input": {}}, headers=node.headers
            )
            assert started.status_code == 201
            _wait(lambda: bool(receiver.applied), "the effect to be delivered")
            client.revoke_secret_grant(grant["id"])
            _wait(lambda: "supplier_token" not in _vault_names(data), "the revocation")
            # Without its credential, the next effect waits in the outbox.
            run = httpx.post(
                f"{node.url}/api/agents/inventory/runs", json={"input": {}}, headers=node.headers
            )
            assert run.status_code == 201
            _wait(lambda: _pending_error(data) is not None, "the effect to be refused")
            assert "supplier_token" in str(_pending_error(data))
            _wait(
                lambda: b'"kind":"trace"' in b"".join(sent.telemetry()),
                "a trace to reach the fleet",
            )
            node_log = node.log()
    finally:
        fleet.stop()
        receiver.stop()
        root.removeHandler(handler)
        root.level = previous_level
    assert [r.headers.get("Authorization") for r in receiver.requests] == [f"Bearer {GRANTED}"]
    assert "secret grants from the fleet: supplier_token stored" in node_log
    with Database(data / "node.db") as db:
        db.checkpoint()
    leaks = encodings(GRANTED)
    assert any(b'"device_id"' in body for body in sent.bodies)  # the node's syncs went through
    places = {
        "node log": node_log.encode(),
        "fleet log": fleet_logs.getvalue().encode(),
        "what the node sent the fleet": b"\n".join(sent.bodies),
        "the telemetry the node sent, decompressed": b"\n".join(sent.telemetry()),
    }
    for folder in (data, tmp_path / "fleet"):
        places.update({str(p): stored_bytes([p]) for p in folder.rglob("*") if p.is_file()})
    places.update({str(p): stored_bytes([p]) for p in tmp_path.glob("fleet.db*")})
    assert any(p.endswith("fleet.db") for p in places)
    assert str(data / "node.db") in places
    for where, content in places.items():
        for form in leaks:
            assert form not in content, f"the secret leaked into {where} as {form!r}"


class Recorder:
    """An ASGI layer that keeps the body of every device request (mutual TLS: a client
    certificate) on its way to the app; operators' requests pass unrecorded."""

    def __init__(self, app: Any) -> None:
        self.app = app  # named so: FleetServer finds the Starlette app below it
        self.bodies: list[bytes] = []
        self.telemetry_bodies: list[bytes] = []

    def telemetry(self) -> list[bytes]:
        """The telemetry batches received, decompressed (they travel zstd-compressed)."""
        return [decode_batch(body).model_dump_json().encode() for body in self.telemetry_bodies]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from edgeos.security.tls import peer_certificate

        device = scope["type"] == "http" and peer_certificate(scope) is not None

        async def received() -> Any:
            message = await receive()
            if device and message["type"] == "http.request":
                self.bodies.append(message.get("body", b""))
                if scope["path"].endswith("/telemetry"):
                    self.telemetry_bodies.append(message.get("body", b""))
            return message

        await self.app(scope, received, send)


def _pending_error(data: Path) -> str | None:
    raw = sqlite3.connect(f"file:{data / 'node.db'}?mode=ro", uri=True)
    try:
        row = raw.execute(
            "SELECT last_error FROM outbox WHERE state = 'pending' AND last_error IS NOT NULL"
        ).fetchone()
    finally:
        raw.close()
    return None if row is None else str(row[0])
