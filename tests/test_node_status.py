"""``GET /api/status`` and ``edgeos node status`` against a real node process.

The node has a registered model (loaded by one inference call), an installed agent with
one succeeded and one failed run, and a connector whose target refuses every effect, so
each section of the snapshot has something to show.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edgeos import __version__
from edgeos.agents import manage
from edgeos.node.process import ServerProcess, free_port, node_process
from edgeos.node.status import NodeStatus, collect_status, fleet_link, process_started_at
from edgeos.node.usage import disk_usage, tree_bytes
from edgeos.runtime import ModelRegistry
from edgeos.settings import load_settings
from edgeos.state import Database
from tests import onnx_models
from tests.test_agents import make_bundle

CODE = """
def sense(ctx, data):
    if (data or {}).get("fail"):
        raise RuntimeError("sensor offline")
    return {"sku": "A-1"}

def reason(ctx, data):
    return data

def act(ctx, data):
    ctx.effect("supplier.reorder", {"sku": data["sku"], "qty": 10})
    return data

def learn(ctx, data):
    return {"done": True}
"""


class _Refuse(BaseHTTPRequestHandler):
    """A supplier that refuses every order: a 400 is not retried, so the effect dies."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"error": "unknown sku"}'
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def supplier() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def data_dir(tmp_path: Path, supplier: str) -> Path:
    """A data directory with a model and an agent bound to the refusing supplier."""
    data = tmp_path / "node"
    with Database(data / "node.db") as db:
        ModelRegistry(db, data / "models").add(onnx_models.mlp(tmp_path / "mlp.onnx"), name="mlp")
        manage.add_agent(
            db, make_bundle(tmp_path, code=CODE), data / "agents",
            models=["mlp"], connectors=["supplier"],
        )  # fmt: skip
    (data / "connectors.yaml").write_text(
        f"supplier:\n  type: http\n  base_url: {supplier}\n"
        "  operations:\n    reorder: {method: POST, path: /orders}\n"
    )
    return data


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeos", "node", "status", "--data-dir", str(data_dir), *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )  # fmt: skip


def settle(node: ServerProcess) -> dict[str, Any]:
    """Load the model, run the agent twice (once failing); the status once all is done."""
    with node.client(timeout=10) as client:
        infer = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                             "data": [0.1, 0.2, 0.3, 0.4]}]}  # fmt: skip
        assert client.post("/v2/models/mlp/infer", json=infer).status_code == 200
        for data in ({}, {"fail": True}):
            assert (
                client.post("/api/agents/inventory/runs", json={"input": data}).status_code == 201
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            response = client.get("/api/status")
            assert response.status_code == 200, (
                f"GET /api/status answered {response.status_code}: is status_routes wired "
                "into Node.app()?"
            )
            doc: dict[str, Any] = response.json()
            runs = doc["agents"][0]["runs"]
            if runs == {"succeeded": 1, "failed": 1} and doc["buffers"]["outbox"]["dead"] == 1:
                return doc
            time.sleep(0.1)
    raise AssertionError(f"the runs did not finish: {doc}")


def test_status_shows_every_part_of_a_running_node(data_dir: Path) -> None:
    with node_process(data_dir) as node:
        doc = settle(node)
        assert node.process is not None
        pid = node.process.pid

        assert doc["version"] == __version__
        assert doc["running"] is True
        assert doc["pid"] == pid
        assert 0 < doc["uptime_seconds"] < 120
        assert doc["listen"] == node.url
        assert doc["data_dir"] == str(data_dir)
        assert doc["fleet"] == "not enrolled"
        assert doc["agents"] == [
            {"name": "inventory", "version": "1.0", "paused": False,
             "runs": {"succeeded": 1, "failed": 1}}
        ]  # fmt: skip
        [loaded] = doc["models_loaded"]
        assert (loaded["name"], loaded["version"]) == ("mlp", "1")
        assert loaded["providers"] == ["CPUExecutionProvider"]
        assert loaded["size_bytes"] > 0
        assert doc["models_registered"] == [{"name": "mlp", "versions": 1, "default": "1"}]
        assert doc["memory"]["process"] > 20 * 1024 * 1024
        assert doc["memory"]["models"] == loaded["size_bytes"]
        assert doc["model_budget_bytes"] == 512 * 1024 * 1024
        assert set(doc["disk"]) == {"database", "models", "agents", "other"}
        assert doc["disk"]["database"] > 0
        assert doc["disk"]["models"] > 0
        assert doc["disk"]["agents"] > 0
        assert doc["buffers"] == {
            "outbox": {"pending": 0, "delivered": 0, "dead": 1},
            "open_escalations": 0,
            "outbound": {},
            "outbound_dropped": {},
        }
        errors = {e["kind"]: e for e in doc["last_errors"]}
        assert "sensor offline" in errors["run"]["message"]
        assert errors["run"]["source"].endswith("of inventory")
        assert "400" in errors["effect"]["message"]
        assert "supplier.reorder" in errors["effect"]["source"]
        assert all(
            doc["collected_at"] - 120 < e["at"] <= doc["collected_at"] for e in errors.values()
        )

        # The command asks the node: the same snapshot, a moment later.
        done = cli("--json", "--url", node.url, data_dir=data_dir)
        assert done.returncode == 0, done.stderr
        again = json.loads(done.stdout)
        # The database grows on its own (trace spans are written in the background).
        moving = {"collected_at", "uptime_seconds", "memory", "disk"}
        assert {k: v for k, v in again.items() if k not in moving} == {
            k: v for k, v in doc.items() if k not in moving
        }
        assert {k: v for k, v in again["disk"].items() if k != "database"} == {
            k: v for k, v in doc["disk"].items() if k != "database"
        }
        assert again["uptime_seconds"] >= doc["uptime_seconds"]

        text = cli("--url", node.url, data_dir=data_dir)
        assert text.returncode == 0, text.stderr
        for shown in (f"edgeos {__version__}", "running", f"pid {pid}", "not enrolled",
                      "inventory", "1 failed, 1 succeeded", "mlp", "CPUExecutionProvider",
                      "1 dead", "sensor offline", "last errors"):  # fmt: skip
            assert shown in text.stdout, shown


def test_a_stopped_node_is_read_from_its_database(data_dir: Path) -> None:
    with node_process(data_dir) as node:
        running = settle(node)

    done = cli("--json", "--url", node.url, data_dir=data_dir)
    assert done.returncode == 3
    assert f"node not running: no answer at {node.url}" in done.stderr
    doc = json.loads(done.stdout)
    assert doc["running"] is False
    assert (doc["pid"], doc["uptime_seconds"], doc["listen"]) == (None, None, None)
    assert doc["memory"] == {}
    assert doc["models_loaded"] == []
    for same in ("version", "agents", "models_registered", "buffers", "last_errors", "fleet"):
        assert doc[same] == running[same], same

    text = cli("--url", node.url, data_dir=data_dir)
    assert text.returncode == 3
    assert "not running" in text.stdout
    assert "not measured" in text.stdout
    assert "sensor offline" in text.stdout


def test_no_node_and_no_database_is_one_clear_error(tmp_path: Path) -> None:
    done = cli("--url", f"http://127.0.0.1:{free_port()}", data_dir=tmp_path / "empty")
    assert done.returncode == 1
    assert "node not running" in done.stderr
    assert "no node database at" in done.stderr
    assert not (tmp_path / "empty").exists()


def test_something_else_on_the_port_is_not_taken_for_a_node(tmp_path: Path, supplier: str) -> None:
    done = cli("--url", supplier, data_dir=tmp_path)
    assert done.returncode == 1
    assert "answered GET /api/status with 501" in done.stderr


def test_the_snapshot_round_trips_and_names_a_pending_fleet_join(tmp_path: Path) -> None:
    data = tmp_path / "node"
    data.mkdir()
    (data / "fleet-join.json").write_text(
        '{"url": "https://fleet.example", "join_token": "secret-join-token"}'
    )
    assert fleet_link(data).startswith("not enrolled (join request for https://fleet.example")
    settings = load_settings({"data_dir": data}, environ={})
    with Database(settings.database_path) as db:
        snapshot = collect_status(db, settings, running=False)
    assert NodeStatus.from_json(json.loads(snapshot.dumps())) == snapshot
    assert b"secret-join-token" not in snapshot.dumps()
    assert time.time() - 3600 < process_started_at() <= time.time()


def test_the_database_is_shown_by_part(data_dir: Path) -> None:
    from edgeos.node.usage import database_usage
    from edgeos.state import Database, journal

    path = data_dir / "node.db"
    with Database(path) as db, db.transaction() as conn:
        for i in range(200):
            journal.append(conn, f"r{i}", "step_completed", {"i": i, "pad": "x" * 400}, at=1.0)
        conn.execute(
            "INSERT INTO feedback (agent, run_id, at, decision) VALUES ('a', 'r', 1.0, '{}')"
        )
    parts = database_usage(path)
    assert {"journal", "learning", "memory", "runs"} <= set(parts)
    assert parts["journal"] > 50_000  # 200 records of 400 bytes and more
    assert next(iter(parts)) == "journal"  # largest first
    assert sum(parts.values()) == path.stat().st_size
    text = cli(data_dir=data_dir)
    assert text.returncode == 3, text.stderr  # the node is not running: read from the file
    assert "journal" in text.stdout.split("database", 1)[1]


def test_disk_parts_count_each_file_once_where_it_lies(tmp_path: Path) -> None:
    files = {
        "node.db": 4096, "node.db-wal": 8240, "node.db-shm": 32768,
        "models/ab/cd.onnx": 1000, "agents/inventory/1.0.0/agent.yaml": 300,
        "api-token": 44, "node.yaml": 60, "keys/device.key": 227,
        "backups/node.db": 4096,  # a copy elsewhere is not the database
    }  # fmt: skip
    for name, size in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    parts = disk_usage(tmp_path)
    assert parts == {"database": 45104, "models": 1000, "agents": 300, "other": 4427}
    assert sum(parts.values()) == tree_bytes(tmp_path)
