"""Events from a real broker start agents on a real node."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from edgeos.agents import manage, store
from edgeos.node.process import node_process
from edgeos.state import Database
from tests.test_agents import make_bundle

BROKER = os.environ.get("EDGEOS_TEST_MQTT_URL")


@pytest.mark.skipif(not BROKER, reason="EDGEOS_TEST_MQTT_URL is not set: no MQTT broker to use")
def test_an_mqtt_message_starts_the_agent_listening_for_it(tmp_path: Path) -> None:
    import paho.mqtt.client as mqtt
    import paho.mqtt.publish as publish

    assert BROKER is not None
    host, port = BROKER.removeprefix("mqtt://").split(":")
    topic = f"edgeos/test/{uuid.uuid4().hex}/sales"
    data = tmp_path / "node"
    data.mkdir()
    (data / "connectors.yaml").write_text(
        yaml.safe_dump(
            {
                "pos": {
                    "type": "mqtt",
                    "url": BROKER,
                    "subscribe": {"pos.sales": {"topic": topic}},
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
    with node_process(data) as node:
        time.sleep(0.5)  # let the subscription settle before publishing
        publish.single(
            topic, json.dumps({"sku": "MQ-1"}), qos=1, hostname=host, port=int(port),
            protocol=mqtt.MQTTv5,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        runs: list[store.Run] = []
        while time.monotonic() < deadline and not runs:
            with Database(data / "node.db") as db:
                runs = [r for r in store.runs(db) if r.state == "succeeded"]
            time.sleep(0.1)
        status = httpx.get(f"{node.url}/api/status", headers=node.headers).json()
    assert runs, "no run started from the MQTT message"
    (run,) = runs
    assert run.trigger == "event:pos.sales"
    assert run.input["topic"] == topic
    assert run.input["payload"] == {"sku": "MQ-1"}
    assert status["agents"][0]["name"] == "inventory"
