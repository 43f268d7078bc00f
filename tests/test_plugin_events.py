"""A plugin's event source on a real node: the example plugin, installed the way ``pip``
makes it visible, emits the notes of its service's feed as a contract's events, which
start the agent listening for them; a note the contract refuses starts nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from edgeos.agents import manage, store
from edgeos.node.process import node_process
from edgeos.state import Database
from tests.test_agents import make_bundle
from tests.test_connector_conformance import PLUGIN_DIR, EchoService, register

POS = {
    "capability": "pos",
    "version": "1.0",
    "events": {
        "sales": {
            "data": {
                "type": "object",
                "required": ["sku", "qty"],
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
            }
        }
    },
}


def test_a_plugin_source_starts_the_agent_listening_for_its_event(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    register(monkeypatch, site)
    service = EchoService()
    data = tmp_path / "node"
    (data / "contracts").mkdir(parents=True)
    (data / "contracts" / "pos.yaml").write_text(yaml.safe_dump(POS))
    (data / "connectors.yaml").write_text(
        yaml.safe_dump(
            {
                "till": {
                    "type": "echo",
                    "port": service.port,
                    "poll_s": 0.05,
                    "implements": {"capability": "pos", "version": "1.0"},
                    "subscribe": {"pos.sales": {"channel": "sales"}},
                },
                "supplier": {
                    "type": "http",
                    "base_url": "http://127.0.0.1:9",
                    "operations": {"reorder": {"method": "POST", "path": "/o"}},
                },
            }
        )
    )
    bundle = make_bundle(tmp_path, triggers=[{"event": "pos.sales"}])
    with Database(data / "node.db") as db:
        manage.add_agent(db, bundle, data / "agents", models=[], connectors=["supplier"])
    # Broken first: the contract refuses it, and the note after it still comes.
    service.note("sales", {"sku": "EC-0"})
    service.note("sales", {"sku": "EC-1", "qty": 2})
    path = os.pathsep.join([str(site), str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")])
    try:
        with node_process(data, PYTHONPATH=path) as node:
            runs: list[store.Run] = []
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not runs:
                time.sleep(0.1)
                with Database(data / "node.db") as db:
                    runs = [r for r in store.runs(db) if r.state == "succeeded"]
            time.sleep(0.3)  # and nothing more
            with Database(data / "node.db") as db:
                runs = list(store.runs(db))
            log = node.log()
    finally:
        service.stop()
    assert [(r.trigger, r.input) for r in runs] == [
        ("event:pos.sales", {"sku": "EC-1", "qty": 2})
    ], log
    refused = [line for line in log.splitlines() if "pos.sales refused" in line]
    assert len(refused) == 1
    assert "qty" in refused[0]
    # What the source emitted is remembered: a restart does not emit it again.
    assert (data / "sources" / "plugin-till" / "position").read_text() == "2"
