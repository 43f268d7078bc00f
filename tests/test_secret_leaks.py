"""A run that uses a secret end to end leaves no byte of it in the node's files or logs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from edgeos.agents import manage
from edgeos.node.process import node_process
from edgeos.state import Database
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
            started = httpx.post(f"{node.url}/api/agents/inventory/runs", json={"input": {}})
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
            assert TOKEN.encode() not in path.read_bytes(), f"the secret leaked into {path}"
