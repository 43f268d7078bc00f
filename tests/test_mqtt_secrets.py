"""MQTT subscriptions whose broker URL names secrets: the credentials come from the vault,
as far as the binding's scopes allow, before every connection.

The shared test broker (``EDGEOS_TEST_MQTT_URL``) lets anyone in, so it cannot tell a right
password from a wrong one: these tests start a Mosquitto of their own on loopback, with a
password file and anonymous clients refused (they skip when ``mosquitto`` is not
installed). The node test runs a real node process against it.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgeos.agents import manage, store
from edgeos.connectors import MqttConnectorConfig, parse_connectors, start_sources, stop_sources
from edgeos.connectors.mqtt import MqttSource
from edgeos.connectors.vault import Vault, load_key
from edgeos.node.process import node_process
from edgeos.state import Database
from tests.services import answers
from tests.test_agents import make_bundle
from tests.test_connectors import closed_port, run
from tests.test_connectors_files import Sink

USER, PASSWORD = "edge-42", "mq-pass-7f3e9a1c"


@dataclass
class Broker:
    """A Mosquitto on loopback that takes only ``USER`` with ``PASSWORD``."""

    port: int

    def url(self, userinfo: str) -> str:
        return f"mqtt://{userinfo}@127.0.0.1:{self.port}"

    def publish(self, topic: str, payload: bytes) -> None:
        client = Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        client.username_pw_set(USER, PASSWORD)
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        try:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
        finally:
            client.disconnect()
            client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto is not installed: no broker with passwords to test against")
    folder = tmp_path / "broker"
    folder.mkdir()
    passwords = folder / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwords), USER, PASSWORD],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    port = closed_port()
    conf = folder / "mosquitto.conf"
    # Run as whoever runs the tests (as root, mosquitto would switch to its own user, who
    # cannot read the test's folder).
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
        f"persistence false\nuser {getpass.getuser()}\n"
    )
    process = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not answers("127.0.0.1", port):
            assert process.poll() is None, "mosquitto exited at start"
            assert time.monotonic() < deadline, "mosquitto did not start listening"
            time.sleep(0.05)
        yield Broker(port)
    finally:
        process.terminate()
        process.wait(10)


def plant(url: str, topic: str, **extra: Any) -> dict[str, Any]:
    return {"type": "mqtt", "url": url, "subscribe": {"alarm": {"topic": topic}}, **extra}


def vault_of(db: Database) -> Vault:
    return Vault(db, load_key(db.path.parent))


def test_a_subscription_with_secrets_in_its_url_loads() -> None:
    url = "mqtt://${secret:mqtt_user}:${secret:mqtt_password}@broker.local:1883"
    config = parse_connectors({"plant": plant(url, "a/b")}, "connectors.yaml")["plant"]
    assert isinstance(config, MqttConnectorConfig)
    assert config.url == url  # the reference is kept, never its value


def test_a_subscription_reads_its_credentials_from_the_vault(
    broker: Broker, db: Database, tmp_path: Path
) -> None:
    topic = f"edgeos-test/{uuid.uuid4().hex[:12]}/alarm"
    vault = vault_of(db)
    vault.set("mqtt_password", PASSWORD, scopes=["plant"])
    configs = parse_connectors(
        {"plant": plant(broker.url(f"{USER}:${{secret:mqtt_password}}"), topic)}, "test"
    )

    async def go() -> list[tuple[str, Any]]:
        sink = Sink()
        sources = await start_sources(
            configs, sink, state_dir=tmp_path / "state",
            secrets=lambda name, scope: vault.get(name, scope=scope),
        )  # fmt: skip
        try:
            (source,) = sources
            assert isinstance(source, MqttSource)
            await source.ready()
            await asyncio.to_thread(broker.publish, topic, b'{"level": 3}')
            return await sink.wait_for(1)
        finally:
            await stop_sources(sources)

    assert run(go()) == [("alarm", {"topic": topic, "payload": {"level": 3}})]


def test_a_secret_not_granted_to_the_binding_is_not_used_until_it_is(
    broker: Broker, db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The source starts without its secret, says why it cannot connect (never with a
    value), and connects on its own once the secret is granted to one of its scopes."""
    topic = f"edgeos-test/{uuid.uuid4().hex[:12]}/alarm"
    vault = vault_of(db)
    # The value is in the vault, but for another binding's scope only.
    vault.set("mqtt_password", PASSWORD, scopes=["billing"])
    body = plant(broker.url(f"{USER}:${{secret:mqtt_password}}"), topic, scopes=["plant.read"])
    configs = parse_connectors({"plant": body}, "test")

    async def go() -> list[tuple[str, Any]]:
        sink = Sink()
        started = time.monotonic()
        sources = await start_sources(
            configs, sink, state_dir=tmp_path / "state",
            secrets=lambda name, scope: vault.get(name, scope=scope),
        )  # fmt: skip
        assert time.monotonic() - started < 1  # the node does not wait for a grant
        try:
            (source,) = sources
            assert isinstance(source, MqttSource)
            with pytest.raises(TimeoutError):
                await source.ready(timeout=1.5)
            vault.set("mqtt_password", PASSWORD, scopes=["billing", "plant.read"])
            await source.ready(timeout=10)  # the next attempt reads the vault again
            await asyncio.to_thread(broker.publish, topic, b"smoke")
            return await sink.wait_for(1)
        finally:
            await stop_sources(sources)

    with caplog.at_level(logging.WARNING, logger="edgeos.connectors.mqtt"):
        assert run(go()) == [("alarm", {"topic": topic, "payload": "smoke"})]
    warnings = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert warnings
    assert "secret 'mqtt_password' is not granted to binding 'plant'" in warnings[0]
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)


def test_a_node_subscribes_with_a_secret_from_its_vault(broker: Broker, tmp_path: Path) -> None:
    topic = f"edgeos-test/{uuid.uuid4().hex[:12]}/sales"
    data = tmp_path / "node"
    data.mkdir()
    (data / "connectors.yaml").write_text(
        yaml.safe_dump(
            {
                "pos": {
                    "type": "mqtt",
                    "url": broker.url(f"{USER}:${{secret:pos_password}}"),
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
        vault_of(db).set("pos_password", PASSWORD, scopes=["pos"])
    with node_process(data) as node:
        runs: list[store.Run] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not runs:
            # Published until a run starts: the subscription settles in the background.
            broker.publish(topic, b'{"sku": "MQ-1"}')
            time.sleep(0.3)
            with Database(data / "node.db") as db:
                runs = [r for r in store.runs(db) if r.state == "succeeded"]
        log = node.log()
    assert runs, f"no run started from the MQTT message; node log:\n{log}"
    assert runs[0].trigger == "event:pos.sales"
    assert runs[0].input["payload"] == {"sku": "MQ-1"}
    assert PASSWORD not in log
