"""The MQTT connector and source against a real Mosquitto broker.

``EDGEOS_TEST_MQTT_URL`` names the broker (``python -m tests.services pytest ...`` sets it
when one answers on loopback); without it the broker tests skip. Every test uses topics
under a fresh prefix, so tests do not see each other's messages. What the connector
published is checked by an independent paho subscriber, not by the connector itself.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgeos.connectors import (
    Connector,
    DeliveryWorker,
    MqttConnectorConfig,
    Source,
    UnknownOperation,
    build,
    build_all,
    load_connectors,
    parse_connectors,
    start_sources,
    stop_sources,
)
from edgeos.connectors.mqtt import KEY_PROPERTY, MqttConnector, MqttSource
from edgeos.errors import ManifestError
from edgeos.state import Database, outbox
from edgeos.state.outbox import OutboxEntry
from tests.test_connectors import closed_port, failure, opened, order, run
from tests.test_connectors_files import Sink

MQTT_URL = os.environ.get("EDGEOS_TEST_MQTT_URL")


@pytest.fixture
def broker() -> str:
    if not MQTT_URL:
        pytest.skip(
            "EDGEOS_TEST_MQTT_URL is not set: no MQTT broker to test against "
            "(run `python -m tests.services pytest ...` to use Mosquitto on loopback)"
        )
    return MQTT_URL


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own."""
    return f"edgeos-test/{uuid.uuid4().hex[:12]}"


@dataclass
class Got:
    """One message as the independent subscriber saw it."""

    topic: str
    payload: Any
    qos: int
    key: str | None


class Listener:
    """An independent paho subscriber (MQTT 5) that records what arrives."""

    def __init__(self, url: str, topic: str) -> None:
        parts = urlsplit(url)
        self.messages: list[Got] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.loop_start()
        assert subscribed.wait(5), "the test subscriber could not subscribe"

    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        properties = getattr(message, "properties", None)
        pairs = dict(getattr(properties, "UserProperty", None) or [])
        got = Got(
            message.topic, orjson.loads(message.payload), message.qos, pairs.get(KEY_PROPERTY)
        )
        with self.lock:
            self.messages.append(got)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Got]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.01)
        raise AssertionError(f"{count} messages expected, got {len(self.messages)}")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def listener(broker: str, prefix: str) -> Iterator[Listener]:
    subscriber = Listener(broker, f"{prefix}/#")
    try:
        yield subscriber
    finally:
        subscriber.stop()


def publish(url: str, topic: str, payload: bytes, *, qos: int = 1) -> None:
    """Publish one message with an independent client and wait for its PUBACK."""
    parts = urlsplit(url)
    client = Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=qos).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def mqtt_binding(url: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "mqtt",
        "url": url,
        "timeout_s": 2,
        "operations": {"reorder": {"topic": f"{prefix}/orders"}},
        **extra,
    }


def make(url: str, prefix: str, **extra: Any) -> Connector:
    return build(parse_connectors({"plant": mqtt_binding(url, prefix, **extra)}, "test")["plant"])


# -- effects: the connector contract --------------------------------------------------
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_publishes_json_with_qos1_and_the_key(
    broker: str, prefix: str, listener: Listener, protocol: str
) -> None:
    async def go() -> dict[str, Any] | None:
        async with opened(make(broker, prefix, protocol=protocol)) as connector:
            assert isinstance(connector, Connector)
            assert connector.name == "plant"
            return await connector.deliver("reorder", order("A-1", 3), "run1:0:0")

    result = run(go())
    assert result == {"topic": f"{prefix}/orders", "subscribers": True}
    (got,) = listener.wait_for(1)
    assert got.topic == f"{prefix}/orders"
    assert got.qos == 1
    if protocol == "5":
        assert got.payload == order("A-1", 3)
        assert got.key == "run1:0:0"
    else:  # no properties in 3.1.1: the key travels in an envelope
        assert got.payload == {"idempotency_key": "run1:0:0", "payload": order("A-1", 3)}
        assert got.key is None


def test_redelivery_carries_the_same_key_so_subscribers_can_drop_it(
    broker: str, prefix: str, listener: Listener
) -> None:
    async def go() -> None:
        async with opened(make(broker, prefix)) as connector:
            for _ in range(3):
                await connector.deliver("reorder", order(), "run1:0:0")
            await connector.deliver("reorder", order("B-2", 1), "run2:0:0")

    run(go())
    got = listener.wait_for(4)
    # A broker does not deduplicate; what it passes on lets the receiver do it.
    assert [g.key for g in got] == ["run1:0:0"] * 3 + ["run2:0:0"]
    applied = {g.key: g.payload for g in got}
    assert applied == {"run1:0:0": order(), "run2:0:0": order("B-2", 1)}


def test_concurrent_deliveries_each_wait_for_their_own_puback(
    broker: str, prefix: str, listener: Listener
) -> None:
    async def go() -> list[dict[str, Any] | None]:
        async with opened(make(broker, prefix)) as connector:
            calls = [connector.deliver("reorder", order(f"S-{i}", 1), f"k{i}") for i in range(25)]
            return await asyncio.gather(*calls)

    results = run(go())
    assert len(results) == 25
    got = listener.wait_for(25)
    assert sorted(g.key or "" for g in got) == sorted(f"k{i}" for i in range(25))


def test_no_subscriber_is_still_delivered(broker: str, prefix: str) -> None:
    async def go() -> dict[str, Any] | None:
        async with opened(make(broker, prefix)) as connector:
            return await connector.deliver("reorder", order(), "k")

    # MQTT 5 PUBACK 0x10 "no matching subscribers": the broker took it all the same.
    assert run(go()) == {"topic": f"{prefix}/orders", "subscribers": False}


def test_broker_down_is_retryable_and_names_binding_and_operation(prefix: str) -> None:
    url = f"mqtt://edge:s3cret@127.0.0.1:{closed_port()}"

    async def go() -> list[Any]:
        async with opened(make(url, prefix)) as connector:
            started = time.monotonic()
            error = await failure(connector, "reorder", order(), "run1:0:0")
            return [error, time.monotonic() - started]

    error, took = run(go())
    assert error.retryable
    assert error.retry_after is None
    assert "'plant'" in str(error)
    assert "'reorder'" in str(error)
    assert "ConnectionRefusedError" in str(error)
    assert "s3cret" not in str(error)  # messages go to the journal: no credentials
    assert took < 2


def test_unknown_operation_is_not_retryable(broker: str, prefix: str) -> None:
    async def go() -> Any:
        async with opened(make(broker, prefix)) as connector:
            return await failure(connector, "cancel", order(), "k")

    error = run(go())
    assert isinstance(error, UnknownOperation)
    assert not error.retryable
    assert "reorder" in str(error)


def test_a_binding_that_only_subscribes_refuses_effects_clearly() -> None:
    binding = {"type": "mqtt", "url": "mqtt://127.0.0.1", "subscribe": {"x": {"topic": "a/#"}}}
    connectors = build_all(parse_connectors({"plant": binding}, "test"))

    async def go() -> Any:
        async with opened(connectors["plant"]) as connector:
            return await failure(connector, "alarm", order(), "k")

    error = run(go())
    assert isinstance(error, UnknownOperation)
    assert "known: none" in str(error)


def test_payload_that_is_not_json_is_permanent(broker: str, prefix: str) -> None:
    async def go() -> Any:
        async with opened(make(broker, prefix)) as connector:
            return await failure(connector, "reorder", {"when": object()}, "k")

    error = run(go())
    assert not error.retryable
    assert "not JSON" in str(error)


def test_close_is_safe_twice_and_before_use(broker: str, prefix: str, listener: Listener) -> None:
    async def go() -> None:
        await make(broker, prefix).close()
        connector = make(broker, prefix)
        await connector.deliver("reorder", order(), "k")
        await connector.close()
        await connector.close()

    run(go())
    assert len(listener.wait_for(1)) == 1


def test_a_broker_down_leaves_the_effect_in_the_outbox_until_it_is_back(
    db: Database, broker: str, prefix: str, listener: Listener
) -> None:
    """The issue's "broker down": a clear error naming the binding and operation, the
    effect stays pending for a retry, and it is delivered once the broker answers."""
    now = [1_700_000_000.0]
    entry = OutboxEntry("run1:0:0", "run1", "plant", "reorder", order())
    with db.transaction() as conn:
        assert outbox.enqueue(conn, entry, at=now[0])

    async def attempt(connector: Connector) -> int:
        worker = DeliveryWorker(
            db, {"plant": connector}, clock=lambda: now[0], base_delay=0.01, max_delay=0.05
        )
        async with opened(connector):
            return await worker.drain_once()

    assert run(attempt(make(f"mqtt://127.0.0.1:{closed_port()}", prefix))) == 1
    pending = outbox.get(db, "run1:0:0")
    assert pending is not None
    assert pending.state == outbox.PENDING
    assert pending.last_error is not None
    assert "connector 'plant' operation 'reorder'" in pending.last_error
    now[0] += 1
    assert run(attempt(make(broker, prefix))) == 1
    delivered = outbox.get(db, "run1:0:0")
    assert delivered is not None
    assert delivered.state == outbox.DELIVERED
    (got,) = listener.wait_for(1)
    assert got.key == "run1:0:0"


# -- events: the source ---------------------------------------------------------------
def source(url: str, prefix: str, **extra: Any) -> MqttSource:
    binding = {
        "type": "mqtt",
        "url": url,
        "subscribe": {
            "temperature": {"topic": f"{prefix}/+/temperature"},
            "alarm": {"topic": f"{prefix}/alarm"},
        },
        **extra,
    }
    config = parse_connectors({"plant": binding}, "test")["plant"]
    assert isinstance(config, MqttConnectorConfig)
    return MqttSource.from_config(config)


def test_subscribed_messages_become_events(broker: str, prefix: str) -> None:
    async def go() -> list[tuple[str, Any]]:
        sink = Sink()
        subscriber = source(broker, prefix)
        assert isinstance(subscriber, Source)
        await subscriber.start(sink)
        try:
            await subscriber.ready()
            await asyncio.to_thread(publish, broker, f"{prefix}/line1/temperature", b'{"c": 71.5}')
            await asyncio.to_thread(publish, broker, f"{prefix}/alarm", b"smoke in hall 2")
            await asyncio.to_thread(publish, broker, f"{prefix}/line2/temperature", b"\xff\x00")
            await asyncio.to_thread(publish, broker, f"{prefix}/other", b"{}")
            return await sink.wait_for(3)
        finally:
            await subscriber.stop()
            await subscriber.stop()

    assert run(go()) == [
        ("temperature", {"topic": f"{prefix}/line1/temperature", "payload": {"c": 71.5}}),
        ("alarm", {"topic": f"{prefix}/alarm", "payload": "smoke in hall 2"}),
        ("temperature", {"topic": f"{prefix}/line2/temperature", "payload_base64": "/wA="}),
    ]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_an_effect_published_by_a_node_arrives_as_an_event_with_its_key(
    broker: str, prefix: str, protocol: str
) -> None:
    async def go() -> list[tuple[str, Any]]:
        sink = Sink()
        subscriber = source(broker, prefix, protocol=protocol)
        await subscriber.start(sink)
        try:
            await subscriber.ready()
            binding = {"alarm": {"topic": f"{prefix}/alarm"}}
            for sent_with in ("5", "3.1.1"):
                async with opened(
                    make(broker, prefix, protocol=sent_with, operations=binding)
                ) as c:
                    await c.deliver("alarm", {"level": 3}, f"run-{sent_with}:0:0")
            return await sink.wait_for(2)
        finally:
            await subscriber.stop()

    data = {"topic": f"{prefix}/alarm", "payload": {"level": 3}}
    # The 3.1.1 envelope reaches every subscriber; a broker passes MQTT 5 user properties
    # on only to MQTT 5 subscribers.
    from_5 = {**data, "key": "run-5:0:0"} if protocol == "5" else data
    assert run(go()) == [("alarm", from_5), ("alarm", {**data, "key": "run-3.1.1:0:0"})]


def test_a_failing_sink_is_retried_in_order_and_nothing_is_skipped(
    broker: str, prefix: str
) -> None:
    async def go() -> list[tuple[str, Any]]:
        sink = Sink(fail=2)
        subscriber = source(broker, prefix)
        subscriber.retry_delay = 0.02
        await subscriber.start(sink)
        try:
            await subscriber.ready()
            for i in range(3):
                await asyncio.to_thread(publish, broker, f"{prefix}/alarm", str(i).encode())
            return await sink.wait_for(3)
        finally:
            await subscriber.stop()

    assert [data["payload"] for _, data in run(go())] == [0, 1, 2]


def test_a_named_client_gets_the_messages_sent_while_it_was_away(broker: str, prefix: str) -> None:
    client_id = f"edgeos-test-{uuid.uuid4().hex[:8]}"

    async def go() -> list[tuple[str, Any]]:
        sink = Sink()
        first = source(broker, prefix, client_id=client_id)
        await first.start(sink)
        await first.ready()
        await first.stop()
        # The node is down; the broker keeps the QoS 1 message for its session.
        await asyncio.to_thread(publish, broker, f"{prefix}/alarm", b'"while away"')
        again = source(broker, prefix, client_id=client_id)
        await again.start(sink)
        try:
            return await sink.wait_for(1)
        finally:
            await again.stop()
            # Leave no session behind on the shared broker.
            await asyncio.to_thread(forget_session, broker, client_id)

    assert run(go()) == [("alarm", {"topic": f"{prefix}/alarm", "payload": "while away"})]


def forget_session(url: str, client_id: str) -> None:
    parts = urlsplit(url)
    client = Client(CallbackAPIVersion.VERSION2, client_id, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, clean_start=True)
    client.disconnect()


def test_a_source_whose_broker_is_down_starts_and_stops_quietly(prefix: str) -> None:
    async def go() -> None:
        subscriber = source(f"mqtt://127.0.0.1:{closed_port()}", prefix)
        started = time.monotonic()
        await subscriber.start(Sink())
        assert time.monotonic() - started < 1  # the node does not wait for the broker
        await asyncio.sleep(0.1)
        await subscriber.stop()

    run(go())


def test_start_sources_builds_sources_from_connectors_yaml(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "connectors.yaml"
    path.write_text(
        f"plant:\n  type: mqtt\n  url: {broker}\n"
        f"  operations:\n    alarm: {{topic: {prefix}/alarm}}\n"
        f"  subscribe:\n    alarm: {{topic: {prefix}/alarm}}\n"
        f"feed:\n  type: mqtt\n  url: {broker}\n  protocol: 3.1.1\n"
        f"  operations:\n    out: {{topic: {prefix}/out}}\n"
    )
    configs = load_connectors(path)

    async def go() -> list[tuple[str, Any]]:
        sink = Sink()
        sources = await start_sources(configs, sink, state_dir=tmp_path / "state")
        connectors = build_all(configs)
        try:
            assert [s.name for s in sources] == ["plant"]  # feed only publishes
            assert sorted(connectors) == ["feed", "plant"]
            assert isinstance(sources[0], MqttSource)
            await sources[0].ready()
            await connectors["plant"].deliver("alarm", {"fire": True}, "r:0:0")
            return await sink.wait_for(1)
        finally:
            await stop_sources(sources)
            for connector in connectors.values():
                await connector.close()

    data = {"topic": f"{prefix}/alarm", "payload": {"fire": True}, "key": "r:0:0"}
    assert run(go()) == [("alarm", data)]


# -- connectors.yaml ------------------------------------------------------------------
def test_a_good_mqtt_binding_loads(tmp_path: Path) -> None:
    path = tmp_path / "connectors.yaml"
    path.write_text(
        "plant:\n  type: mqtt\n  url: mqtt://edge:pw@broker.local\n  protocol: 5\n"
        "  client_id: edge-42\n"
        "  operations:\n    alarm: {topic: plant/line1/alarm}\n"
        "  subscribe:\n    sensor.reading: {topic: 'plant/+/temperature'}\n"
        "    everything: {topic: '#'}\n"
    )
    config = load_connectors(path)["plant"]
    assert isinstance(config, MqttConnectorConfig)
    assert (config.host, config.port, config.protocol) == ("broker.local", 1883, "5")
    assert config.credentials == ("edge", "pw")
    assert config.operations["alarm"].topic == "plant/line1/alarm"
    assert list(config.subscribe) == ["sensor.reading", "everything"]
    assert isinstance(build(config), MqttConnector)


MQTT = "plant:\n  type: mqtt\n  url: mqtt://127.0.0.1:1883\n"
OPS = "  operations:\n    alarm: {topic: a/b}\n"


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("plant:\n  type: mqtt\n  url: http://h\n" + OPS, "plant.url", "not an mqtt://host"),
        ("plant:\n  type: mqtt\n  url: mqtt://h:99999\n" + OPS, "plant.url", "bad port"),
        ("plant:\n  type: mqtt\n  url: mqtt://h/x\n" + OPS, "plant.url", "must not have a path"),
        ("plant:\n  type: mqtt\n  url: mqtt://u:secret@h/x\n" + OPS, "plant.url", "must not"),
        (MQTT, "plant", "needs operations (to publish) or subscribe"),
        (MQTT + "  operations:\n    alarm: {topic: a/+}\n", "plant.operations.alarm.topic",
         "cannot contain the wildcards"),
        (MQTT + "  operations:\n    alarm: {topic: ''}\n", "plant.operations.alarm.topic",
         "must not be empty"),
        (MQTT + "  operations:\n    alarm: {}\n", "plant.operations.alarm.topic", "required"),
        (MQTT + "  subscribe:\n    x: {topic: 'a/#/b'}\n", "plant.subscribe.x.topic",
         "# must be the last level"),
        (MQTT + "  subscribe:\n    x: {topic: 'a/b+'}\n", "plant.subscribe.x.topic",
         "must be a whole level"),
        (MQTT + "  subscribe:\n    'bad name': {topic: a}\n", "plant.subscribe",
         "event name 'bad name'"),
        (MQTT + "  protocol: 4\n" + OPS, "plant.protocol", "'5' or '3.1.1'"),
        (MQTT + "  qos: 2\n" + OPS, "plant.qos", "unknown field"),
    ],
)  # fmt: skip
def test_each_bad_mqtt_field_is_refused_with_file_and_field(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    path = tmp_path / "connectors.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_connectors(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert f"field '{field}'" in message
    assert reason in message
    assert "secret" not in message
