"""The demo's own fleet: ``edgeos fleet serve`` on loopback, for the demo node to join.

:class:`DemoFleet` starts a fleet in a child process over a fresh data directory (the
first start initializes it: CA, TUF keys, database, admin token), makes a join token for
the demo node, and gives the dashboard's address and a login to print. The node it
enrolls sends its telemetry every second and every trace, so its KPIs, runs, traces and
escalations are on the dashboard while the demo runs. :meth:`DemoFleet.look` reads the
dashboard as a browser would (sign in, open the device) to report what it shows.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx
import yaml

from edgeos.fleet.client import FleetClient
from edgeos.fleet.packing import pack_directory
from edgeos.node.process import ServerProcess, free_port
from edgeos.security.tls import client_ssl_context

#: How often the demo node syncs, and sends telemetry (seconds).
SYNC_INTERVAL_S = 2
TELEMETRY_INTERVAL_S = 1
GROUP = "demo"
#: The policy that lets the demo node send ``internal`` data to the fleet's cloud venue.
CLOUD_POLICY = "demo-venues"


@dataclass(frozen=True)
class FleetView:
    """What the dashboard showed of the demo device."""

    device_id: str
    hostname: str
    #: Runs the device page lists (its most recent, up to the page's limit).
    runs_listed: int
    #: Runs counted in the KPIs the device sent (KPIs travel per closed minute).
    kpi_runs: int
    telemetry_records: int
    escalations: int


class DemoFleet:
    """A fleet on loopback for the demo; a context manager that removes it all on exit."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="edgeos-demo-fleet-"))
        self.data = self.root / "fleet"
        port = free_port()
        self.url = f"https://127.0.0.1:{port}"
        self.dashboard = f"{self.url}/ui/"
        command = [
            sys.executable, "-m", "edgeos", "fleet", "serve", "--data", str(self.data),
            "--port", str(port), "--sync-interval", f"{SYNC_INTERVAL_S}s",
            "--log-level", "warning",
        ]  # fmt: skip
        # Until it is up its CA is unknown: the readiness probe cannot check the certificate.
        self.process = ServerProcess(command, self.url, ready_path="/api/v1/health", verify=False)
        self.admin_token = ""
        self._client: FleetClient | None = None
        self._running = contextlib.ExitStack()

    def start(self) -> DemoFleet:
        """Start the fleet and wait until it answers."""
        self._running.enter_context(self.process)
        self.admin_token = (self.data / "admin-token").read_text().strip()
        self._client = FleetClient.login(self.url, self.admin_token)
        return self

    @property
    def client(self) -> FleetClient:
        """The fleet's API as its admin."""
        if self._client is None:
            raise RuntimeError("the demo fleet is not started")
        return self._client

    def join_token(self) -> str:
        """A one-use join token for the demo node."""
        return str(self.client.create_join_token(GROUP, ttl_s=600)["token"])

    def node_env(self, join_token: str) -> dict[str, str]:
        """The environment that enrolls a node here and makes it send telemetry often."""
        return {
            "EDGEOS_JOIN_TOKEN": join_token,
            "EDGEOS_TELEMETRY_INTERVAL_S": str(TELEMETRY_INTERVAL_S),
            # Loopback: no need to ration bytes; every trace, so every run has its timeline.
            "EDGEOS_TELEMETRY_BYTES_PER_S": str(64 * 1024),
            "EDGEOS_TELEMETRY_TRACE_PERCENT": "100",
        }

    def serve_model(self, name: str, model: Path, manifest: Path) -> None:
        """Publish an ONNX model (with its manifest) as a model artifact, which the
        fleet's cloud venue then serves to enrolled devices."""
        directory = self.root / "artifacts" / name
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model, directory / "model.onnx")
        doc = {"name": name, "version": "1", **yaml.safe_load(manifest.read_text())}
        (directory / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        self.client.publish("model", name, "1", pack_directory(directory))

    def allow_cloud(self, device_id: str, privacy: str = "internal") -> None:
        """Roll out to the device a policy that lets data of ``privacy`` go to the cloud
        (a node that follows a fleet keeps everything on the edge until a policy says)."""
        policy = {"kind": "policy", "name": CLOUD_POLICY, "version": "1",
                  "venues": [{"privacy": privacy, "venue": "cloud"}]}  # fmt: skip
        self.client.publish("policy", CLOUD_POLICY, "1", yaml.safe_dump(policy).encode())
        self.client.request("POST", "/api/v1/rollouts", json={
            "artifact": f"policy/{CLOUD_POLICY}@1", "target": f"device={device_id}",
            "waves": [100], "soak_s": 0})  # fmt: skip

    def device_id(self) -> str | None:
        """The demo device's id, once it enrolled."""
        found = self.client.devices(group=GROUP)
        return str(found[0]["id"]) if found else None

    def kpis_of(self, device_id: str) -> tuple[int, int]:
        """(runs counted in the device's KPIs, telemetry records it sent) so far."""
        now = time.time()
        by_device = self.client.telemetry_kpis("device", device=device_id, start=now - 3600,
                                               end=now + 60)  # fmt: skip
        point = by_device.get(device_id) or {}
        sent = [d for d in self.client.telemetry_devices() if d["device_id"] == device_id]
        return int(point.get("runs") or 0), int(sent[0]["records"]) if sent else 0

    def runs_reported(self, device_id: str) -> int:
        """How many finished runs the device has outlined to the fleet (up to 1000)."""
        logs = self.client.telemetry_events(kind="log", device=device_id, limit=1000)
        return sum(1 for e in logs if e["data"].get("type") == "run")

    def look(self, device_id: str) -> FleetView:
        """Sign in to the dashboard as a browser does and read the device's page."""
        ca = (self.data / "keys" / "ca.crt").read_text()
        with httpx.Client(base_url=self.url, verify=client_ssl_context(ca), timeout=30) as web:
            form = web.get("/ui/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
            if csrf is None:
                raise RuntimeError(f"the dashboard's sign-in page has no form: {form.status_code}")
            signed = web.post("/ui/login", data={"csrf": csrf.group(1), "token": self.admin_token})
            if signed.status_code != 303:
                raise RuntimeError(f"signing in to the dashboard answered {signed.status_code}")
            page = web.get(f"/ui/devices/{device_id}")
            page.raise_for_status()
        title = re.search(r"<h1>(.*?)</h1>", page.text)
        runs = len(set(re.findall(rf'href="/ui/devices/{device_id}/runs/([^"]+)"', page.text)))
        kpi_runs, records = self.kpis_of(device_id)
        escalations = len(self.client.approvals(device=device_id))
        return FleetView(device_id, title.group(1) if title else "", runs, kpi_runs, records,
                         escalations)  # fmt: skip

    def close(self) -> None:
        """Stop the fleet and remove its directory. Safe to call twice."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._running.close()  # SIGTERM, then the process's log is closed
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> DemoFleet:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def login_lines(fleet: DemoFleet) -> list[str]:
    """What to print so a person can open the dashboard."""
    return [
        f"fleet dashboard: {fleet.dashboard}",
        f"  sign in with the operator token {fleet.admin_token}",
        "  (the fleet's certificate comes from its own CA: let the browser accept it)",
    ]
