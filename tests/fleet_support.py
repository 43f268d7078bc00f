"""Fleet test helpers: databases on SQLite and PostgreSQL, a real TLS fleet server, devices.

``fleet_db_url`` runs a test once on SQLite and once on PostgreSQL (a fresh schema per
test, dropped after; skipped with a reason when ``EDGEOS_TEST_POSTGRES_URL`` is unset).
``running_fleet`` serves a fresh fleet over TLS on a loopback port, in a thread of the
test process, so a test can also reach its database. ``enroll_device`` enrolls a
device the way a node does (its own key, a CSR, the join token) and hands back an
httpx client presenting the device's certificate.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from edgeos.fleet.client import FleetClient
from edgeos.fleet.context import FleetContext
from edgeos.fleet.db import FleetDatabase
from edgeos.fleet.keystore import init_fleet
from edgeos.fleet.settings import FleetConfig
from edgeos.protocol.fleet import Inventory
from edgeos.security.certs import make_csr
from edgeos.security.keys import generate_key, write_private_key, write_public_file
from edgeos.security.tls import client_ssl_context
from tests.loopback import UvicornThread

POSTGRES_URL = os.environ.get("EDGEOS_TEST_POSTGRES_URL")
INVENTORY = Inventory(
    edgeos_version="0.1.0", hostname="test-device", machine="x86_64", cpu_count=2, memory_mb=2048
)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _with_schema(url: str, schema: str) -> str:
    options = quote(f"-c search_path={schema}")
    return f"{url}{'&' if '?' in url else '?'}options={options}&application_name={schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty fleet database: an SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip(
            "EDGEOS_TEST_POSTGRES_URL is not set: no PostgreSQL to test against "
            "(run `python -m tests.services pytest ...` to use one on loopback)"
        )
    import psycopg

    schema = f"edgeos_fleet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield _with_schema(POSTGRES_URL, schema)
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


class FleetServer:
    """A real fleet (TLS, uvicorn) serving ``config`` from a thread of this process."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.url = f"https://127.0.0.1:{config.port}"
        self.admin_token = ""
        self.ca_pem = ""
        self._served: UvicornThread | None = None

    def start(self, *, init: bool = True) -> FleetServer:
        """Initialize the data directory (unless ``init`` is False) and serve."""

        from edgeos.fleet.serve import uvicorn_config

        if init:
            report = init_fleet(self.config)
            self.admin_token = (
                report.admin_token or self.config.admin_token_path.read_text().strip()
            )
        self.ca_pem = (self.config.keys_dir / "ca.crt").read_text()
        self._served = UvicornThread(
            uvicorn_config(self.config, log_level="warning"), name="the fleet server"
        )
        return self

    def stop(self) -> None:
        """Shut down gracefully (lifespan shutdown included), answering waiting long polls
        at once as ``edgeos fleet serve`` does on SIGTERM: a poll whose node has gone would
        otherwise hold the shutdown for its whole wait."""
        served = self._served
        if served is not None:
            if served.loop is not None and served.alive:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    served.loop.call_soon_threadsafe(self._app().state.watcher.close)
            served.stop()

    @property
    def server(self) -> Any:
        """The running ``uvicorn.Server``."""
        if self._served is None:
            raise RuntimeError("the fleet server was not started")
        return self._served.server

    def _app(self) -> Any:
        app = self.server.config.loaded_app
        # uvicorn wraps the app in middleware; the Starlette app is at the bottom.
        while not hasattr(app, "state"):
            app = app.app
        return app

    def app_context(self) -> FleetContext:
        """The serving app's FleetContext (database, CA, TUF repository)."""
        ctx: FleetContext = self._app().state.fleet
        return ctx

    @property
    def db(self) -> FleetDatabase:
        """The serving app's database."""
        return self.app_context().db

    def client(self, token: str | None = None) -> FleetClient:
        """An operator client (the admin token unless another is given)."""
        return FleetClient(self.url, self.admin_token if token is None else token, self.ca_pem)

    def http(self, cert: Path | None = None, key: Path | None = None) -> httpx.Client:
        """A raw HTTPS client trusting the fleet CA, presenting a certificate if given."""
        return httpx.Client(
            base_url=self.url, verify=client_ssl_context(self.ca_pem, cert, key), timeout=30
        )


def fleet_config(data_dir: Path, db_url: str, **overrides: Any) -> FleetConfig:
    """A fleet configuration for tests: loopback, a free port, quick background loops."""
    values: dict[str, Any] = {"port": free_port(), "revision_poll_s": 0.05}
    values.update(overrides)
    return FleetConfig(data_dir=data_dir, db_url=db_url, **values)


@pytest.fixture
def running_fleet(tmp_path: Path, fleet_db_url: str) -> Iterator[FleetServer]:
    """A fresh fleet served over TLS on loopback; its URL, CA and admin token on the object."""
    server = FleetServer(fleet_config(tmp_path / "fleet", fleet_db_url)).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Device:
    """An enrolled device: its id, group, key and certificate files, and an mTLS client."""

    device_id: str
    group: str
    key_path: Path
    cert_path: Path
    http: httpx.Client
    enrollment: dict[str, Any]

    def sync(self, **body: Any) -> httpx.Response:
        """POST /api/v1/sync as this device (``device_id`` filled in unless given)."""
        return self.http.post("/api/v1/sync", json={"device_id": self.device_id, **body})

    def close(self) -> None:
        """Close the client."""
        self.http.close()


def new_device_id() -> str:
    """A fresh device id."""
    return str(uuid.uuid4())


def enroll_request(
    fleet: FleetServer, join_token: str, device_id: str, *, csr_for: str | None = None,
    key: Any = None,
) -> httpx.Response:  # fmt: skip
    """POST /api/v1/enroll with a CSR for ``csr_for`` (default: ``device_id``)."""
    key = key or generate_key()
    body = {
        "join_token": join_token,
        "device_id": device_id,
        "csr_pem": make_csr(key, csr_for or device_id),
        "inventory": INVENTORY.model_dump(),
    }
    with fleet.http() as http:
        return http.post("/api/v1/enroll", json=body)


def enroll_device(
    fleet: FleetServer, join_token: str, directory: Path, *, device_id: str | None = None
) -> Device:
    """Enroll a device as a node does; raises AssertionError naming the refusal."""
    device_id = device_id or new_device_id()
    key = generate_key()
    response = enroll_request(fleet, join_token, device_id, key=key)
    assert response.status_code == 201, response.text
    enrolled = response.json()
    home = directory / device_id
    key_path, cert_path = home / "device.key", home / "device.crt"
    write_private_key(key_path, key)
    write_public_file(cert_path, enrolled["certificate_pem"])
    return Device(device_id, enrolled["group"], key_path, cert_path,
                  fleet.http(cert_path, key_path), enrolled)  # fmt: skip


def join_token(fleet: FleetServer, group: str = "stores", **options: Any) -> str:
    """A new join token for ``group`` from the admin."""
    with fleet.client() as client:
        return str(client.create_join_token(group, **options)["token"])


def audit_rows(fleet: FleetServer, **filters: str) -> list[dict[str, Any]]:
    """The audit log, newest first, through the API."""
    with fleet.client() as client:
        return client.audit(limit=1000, **filters)


def table_snapshot(db: FleetDatabase) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table but the audit log: equal before and after a refusal."""
    import sqlalchemy as sa

    from edgeos.fleet.tables import metadata

    with db.read() as conn:
        snapshot = {
            name: sorted(tuple(row) for row in conn.execute(sa.select(table)))
            for name, table in metadata.tables.items()
            if name != "audit"
        }
    # The TUF store's writer lock is a counter it bumps whenever it looks for work.
    snapshot["fleet_state"] = [row for row in snapshot["fleet_state"] if row[0] != "tuf_lock"]
    return snapshot


# -- artifacts to publish ------------------------------------------------------------------


def agent_dir(
    root: Path, name: str = "restock", version: str = "1", *, steps: str = "check"
) -> Path:
    """An agent bundle directory: agent.yaml naming ``steps`` and agent.py defining check."""
    directory = root / f"{name}-{version}"
    directory.mkdir(parents=True)
    (directory / "agent.yaml").write_text(
        f"name: {name}\nversion: '{version}'\nsteps: [{steps}]\n", encoding="utf-8"
    )
    (directory / "agent.py").write_text(
        "def check(ctx, data):\n    return {'ok': True}\n", encoding="utf-8"
    )
    return directory


def model_dir(root: Path, name: str = "risk", version: str = "1") -> Path:
    """A model directory: model.yaml and one small ONNX file."""
    from tests import onnx_models

    directory = root / f"{name}-{version}"
    directory.mkdir(parents=True)
    (directory / "model.yaml").write_text(
        f"name: {name}\nversion: '{version}'\ntask: regression\n", encoding="utf-8"
    )
    onnx_models.mlp(directory / f"{name}.onnx")
    return directory


def policy_file(root: Path, name: str = "stores", version: str = "1") -> Path:
    """A policy YAML file."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}-{version}.yaml"
    path.write_text(
        f"kind: policy\nname: {name}\nversion: '{version}'\nbudgets: {{max_concurrent_runs: 2}}\n",
        encoding="utf-8",
    )
    return path


# -- a real node whose agent asks people ---------------------------------------------------

ASKING_AGENT_STEPS = """\
def decide(ctx, data):
    choice = ctx.escalate(
        "Reorder " + str(data["units"]) + " units of " + data["sku"] + "?", ["yes", "no"],
        default="no", proposal="yes", timeout=600,
    )
    return {"sku": data["sku"], "reorder": choice == "yes"}
"""


def asking_agent_dir(root: Path) -> Path:
    """``restock@1``: one step that asks a person whether to reorder (proposal: yes)."""
    directory = root / "restock-asks"
    directory.mkdir(parents=True)
    (directory / "agent.yaml").write_text(
        "name: restock\nversion: '1'\nsteps: [decide]\n", encoding="utf-8"
    )
    (directory / "agent.py").write_text(ASKING_AGENT_STEPS, encoding="utf-8")
    return directory


def asking_node(node_dir: Path, fleet_url: str, join: str) -> Any:
    """A real ``edgeos node run`` (not started) with the asking agent installed, set to
    enroll in the fleet at ``fleet_url`` with the join token ``join``."""
    import subprocess
    import sys

    from edgeos.node.process import node_process

    bundle = asking_agent_dir(node_dir.parent / f"{node_dir.name}-bundle")
    subprocess.run(
        [sys.executable, "-m", "edgeos", "agent", "add", str(bundle), "--data-dir", str(node_dir)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    process = node_process(node_dir, EDGEOS_JOIN_TOKEN=join)
    process.command += ["--fleet", fleet_url]
    return process


def wait_for(what: str, observe: Any, timeout: float = 30.0) -> Any:
    """Poll ``observe`` until it returns something truthy; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    seen: Any = None
    while time.monotonic() < deadline:
        seen = observe()
        if seen:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:g} s; last seen {seen!r}")
