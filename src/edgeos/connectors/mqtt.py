"""The MQTT connector: effects are QoS 1 publishes, subscriptions are events.

Effects (:class:`MqttConnector`): the payload is published as JSON to the operation's
topic with QoS 1, and a delivery succeeds only when the broker's PUBACK arrives. The
idempotency key travels with the message so subscribers can drop repeats: as the MQTT 5
user property ``idempotency-key``, or, with MQTT 3.1.1 (no properties), in an envelope
``{"idempotency_key": key, "payload": payload}``. A broker that is down, a lost connection
or a PUBACK that does not come in time are retryable; the retry publishes again with the
same key. A PUBACK that refuses the message for a reason that will not change (not
authorized, bad topic, bad payload) is permanent. The broker does not deduplicate by key
(only subscribers can), so a publish whose PUBACK did not come may have been delivered:
such a failure is ``maybe_applied``, and an operation whose contract says it is not
idempotent is not published again blindly (:mod:`edgeos.connectors.delivery`).

Events (:class:`MqttSource`): each message on a subscribed topic becomes
``emit(event_name, {"topic": ..., "payload": ..., "key": ...})``. Messages are received
with QoS 1 and acknowledged only after ``emit`` returned, that is after the node has
durably started the runs; so a message is never lost between the broker and the node,
though it may be emitted twice after a crash (at-least-once). With ``client_id`` set the
session is persistent and the broker queues messages while the node is away.

Why paho-mqtt 2.x and not aiomqtt: aiomqtt is itself a wrapper of paho that needs the
event loop's ``add_reader`` (absent from the Windows proactor loop); paho's own network
thread, bridged to asyncio with ``call_soon_threadsafe``, works with any loop, keeps one
dependency (pure Python, typed) instead of two, and gives manual acknowledgements.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.connectors.base import DeliveryError, UnknownOperation
from edgeos.connectors.config import (
    MqttConnectorConfig,
    MqttOperation,
    MqttSubscription,
    _shown,
    mqtt_address,
)
from edgeos.connectors.secret_refs import resolve

if TYPE_CHECKING:
    from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    from edgeos.connectors.events import EventSink

log = logging.getLogger("edgeos.connectors.mqtt")

#: The MQTT 5 user property that carries the effect's idempotency key.
KEY_PROPERTY = "idempotency-key"

# PUBACK / CONNACK reason codes that retrying cannot fix (MQTT 5 section 3.4.2.1, 3.2.2.2).
_PERMANENT_PUBACK = {0x87: "not authorized", 0x90: "topic name invalid", 0x99: "bad payload"}
_PERMANENT_CONNACK = {0x84, 0x85, 0x86, 0x87, 0x8C}  # protocol, client id, credentials, auth


def _new_client(
    client_id: str, *, protocol: str, username: str | None, password: str | None, **kwargs: Any
) -> Client:
    # Imported here: paho is only needed by nodes that bind an MQTT broker.
    from paho.mqtt.client import Client
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if protocol == "5" else MQTTProtocolVersion.MQTTv311,
        **kwargs,
    )
    if username is not None:
        client.username_pw_set(username, password)
    return client


def _credentials(
    username: str | None,
    password: str | None,
    secrets: Callable[[str], str] | None,
    *,
    binding: str,
    operation: str,
) -> tuple[str | None, str | None]:
    """The URL's user name and password with their ``${secret:NAME}`` filled from the vault,
    read anew for each connection so that a rotated secret applies at the next one.
    DeliveryError (naming binding and secret) when a secret cannot be read."""
    filled = (
        None if part is None else resolve(
            part, secrets, binding=binding, operation=operation, what="the broker URL"
        ).text
        for part in (username, password)
    )  # fmt: skip
    return next(filled), next(filled)


def _code(reason: Any) -> int:
    """The numeric value of a paho ReasonCode (or a plain int, as 3.1.1 may give)."""
    return int(getattr(reason, "value", reason))


class MqttConnector:
    """Publishes effects to one MQTT broker over one connection, opened on first use."""

    #: The key travels with each message, but the broker forwards repeats all the same.
    idempotency_keys = False

    def __init__(
        self,
        name: str,
        *,
        url: str,
        operations: Mapping[str, MqttOperation],
        protocol: str = "5",
        timeout_s: float = 10.0,
        keepalive_s: int = 60,
        secrets: Callable[[str], str] | None = None,
    ) -> None:
        """``secrets(name)`` fills ``${secret:NAME}`` in the URL's user and password at each
        connection: the vault as far as the binding's scopes allow."""
        self.name = name
        self._secrets = secrets
        self.operations = dict(operations)
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s
        self._host, self._port, self._username, self._password = mqtt_address(url)
        # Messages end up in the outbox and the journal: never with the password in them.
        self._shown_url = _shown(url)
        self._client: Client | None = None
        self._connecting: asyncio.Lock | None = None
        # (client, mid) -> future of the PUBACK's reason code; keyed by client too, so a
        # dropped client's disconnect fails only its own deliveries. Guarded by a lock of
        # our own that is never held while calling paho (paho calls on_publish holding its
        # own lock, and publish takes that lock).
        self._lock = threading.Lock()
        self._waiting: dict[tuple[int, int], asyncio.Future[int]] = {}
        self._early: dict[tuple[int, int], int] = {}

    @classmethod
    def from_config(
        cls, config: MqttConnectorConfig, secrets: Callable[[str], str] | None = None
    ) -> MqttConnector:
        """The connector for a validated binding."""
        return cls(
            config.name,
            url=config.url,
            secrets=secrets,
            operations=config.operations,
            protocol=config.protocol,
            timeout_s=config.timeout_s,
            keepalive_s=config.keepalive_s,
        )

    async def deliver(
        self, operation: str, payload: dict[str, Any], key: str
    ) -> dict[str, Any] | None:
        """Publish ``payload`` as JSON with QoS 1 and wait for the broker's PUBACK."""
        op = self.operations.get(operation)
        if op is None:
            raise UnknownOperation(self.name, operation, list(self.operations))
        try:
            body = orjson.dumps(
                payload if self.protocol == "5" else {"idempotency_key": key, "payload": payload}
            )
        except TypeError as exc:
            raise DeliveryError(
                self.name, operation, f"payload is not JSON: {exc}", retryable=False
            ) from exc
        where = f"publish to {op.topic!r} at {self._shown_url}"
        client = await self._connected(operation)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        info = client.publish(op.topic, body, qos=1, properties=self._properties(key))
        if info.rc != 0:  # not connected any more, or the queue is full
            from paho.mqtt.client import error_string

            self._drop(client)
            raise DeliveryError(
                self.name, operation, f"{where} failed: {error_string(info.rc)}", retryable=True
            )
        slot = (id(client), info.mid)
        with self._lock:
            early = self._early.pop(slot, None)
            if early is None:
                self._waiting[slot] = future
        if early is not None:
            future.set_result(early)
        try:
            code = await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            # The message may still reach the broker; the retry carries the same key.
            self._drop(client)
            raise DeliveryError(
                self.name, operation, f"{where}: no PUBACK within {self.timeout_s:g} s",
                retryable=True, maybe_applied=True,
            ) from None  # fmt: skip
        except ConnectionError as exc:
            # Lost after the publish left: the broker may have taken it.
            raise DeliveryError(
                self.name, operation, f"{where}: {exc}", retryable=True, maybe_applied=True
            ) from exc
        finally:
            with self._lock:
                self._waiting.pop(slot, None)
        if code >= 0x80:
            from paho.mqtt.reasoncodes import ReasonCode

            reason = str(ReasonCode(4, identifier=code))  # 4: PUBACK
            permanent = code in _PERMANENT_PUBACK
            raise DeliveryError(
                self.name, operation, f"{where}: the broker refused it ({reason}, 0x{code:02X})",
                retryable=not permanent,
            )  # fmt: skip
        # 0x10 "no matching subscribers" is a success: the broker took the message.
        return {"topic": op.topic, "subscribers": code != 0x10}

    async def close(self) -> None:
        """Disconnect from the broker. Safe to call twice."""
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(_shut, client)

    # -- internals --------------------------------------------------------------------
    def _properties(self, key: str) -> Properties | None:
        if self.protocol != "5":
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [(KEY_PROPERTY, key)]
        properties.ContentType = "application/json"
        return properties

    async def _connected(self, operation: str) -> Client:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._client is not None and self._client.is_connected():
                return self._client
            if self._client is not None:
                self._drop(self._client)
            self._client = await self._connect(operation)
            return self._client

    async def _connect(self, operation: str) -> Client:
        loop = asyncio.get_running_loop()
        connack: asyncio.Future[int] = loop.create_future()
        # A random client id and a clean session: a publisher keeps no broker-side state,
        # the outbox is what remembers unacknowledged effects.
        username, password = _credentials(
            self._username, self._password, self._secrets, binding=self.name, operation=operation
        )
        client = _new_client(
            f"edgeos-pub-{uuid.uuid4().hex[:12]}",
            protocol=self.protocol,
            username=username,
            password=password,
            reconnect_on_failure=False,
        )
        client.connect_timeout = self.timeout_s

        def settle(code: int) -> None:
            if not connack.done():
                connack.set_result(code)

        def on_connect(
            c: Client, _: Any, flags: ConnectFlags, reason: ReasonCode, props: Any
        ) -> None:
            _call(loop, settle, _code(reason))

        def on_disconnect(
            c: Client, _: Any, flags: DisconnectFlags, reason: ReasonCode, props: Any
        ) -> None:
            _call(loop, settle, 0x88)  # "server unavailable"
            self._fail_waiting(loop, c, f"connection lost ({reason})")

        def on_publish(c: Client, _: Any, mid: int, reason: ReasonCode, props: Any) -> None:
            with self._lock:
                future = self._waiting.pop((id(c), mid), None)
                if future is None:  # acknowledged before deliver() registered its future
                    self._early[(id(c), mid)] = _code(reason)
                    return
            _call(loop, _resolve, future, _code(reason))

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        where = f"cannot connect to {self._shown_url}"
        try:
            # The TCP connect blocks (up to connect_timeout): off the event loop.
            await asyncio.to_thread(client.connect, self._host, self._port, self.keepalive_s)
        except (OSError, ValueError) as exc:
            raise DeliveryError(
                self.name, operation, f"{where}: {type(exc).__name__} ({exc or 'no detail'})",
                retryable=True,
            ) from exc  # fmt: skip
        client.loop_start()
        try:
            code = await asyncio.wait_for(connack, self.timeout_s)
        except TimeoutError:
            await asyncio.to_thread(_shut, client)
            raise DeliveryError(
                self.name, operation, f"{where}: no CONNACK within {self.timeout_s:g} s",
                retryable=True,
            ) from None  # fmt: skip
        except BaseException:
            # Cancelled (a contract's timeout, a shutdown): the client is nobody's yet, so
            # stop its network thread here or it would outlive the connector.
            threading.Thread(target=_shut, args=(client,), daemon=True).start()
            raise
        if code != 0:
            await asyncio.to_thread(_shut, client)
            from paho.mqtt.reasoncodes import ReasonCode

            reason = str(ReasonCode(2, identifier=code)) if code >= 0x80 else f"code {code}"
            # 3.1.1 return codes 1-5 are mapped to MQTT 5 codes by paho; bad credentials
            # and "not authorized" will not fix themselves.
            raise DeliveryError(
                self.name, operation, f"{where}: the broker refused the connection ({reason})",
                retryable=code not in _PERMANENT_CONNACK,
            )  # fmt: skip
        return client

    def _fail_waiting(self, loop: asyncio.AbstractEventLoop, client: Client, why: str) -> None:
        with self._lock:
            mine = [slot for slot in self._waiting if slot[0] == id(client)]
            waiting = [self._waiting.pop(slot) for slot in mine]
            for slot in [slot for slot in self._early if slot[0] == id(client)]:
                del self._early[slot]
        for future in waiting:
            _call(loop, _fail, future, ConnectionError(why))

    def _drop(self, client: Client) -> None:
        """Forget a client that failed: the next delivery connects afresh."""
        if self._client is client:
            self._client = None
        # Stopping paho's thread joins it: not on the event loop.
        threading.Thread(target=_shut, args=(client,), daemon=True).start()


def _call(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> None:
    """Hand a callback from paho's thread to the event loop; a closed loop has no one
    left to tell (the client outlived its user), so that is not an error."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _shut(client: Client) -> None:
    with contextlib.suppress(Exception):
        client.disconnect()
    with contextlib.suppress(Exception):
        client.loop_stop()


def _resolve(future: asyncio.Future[int], code: int) -> None:
    if not future.done():
        future.set_result(code)


def _fail(future: asyncio.Future[int], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class _NoCredentials(OSError):
    """A secret of the broker URL cannot be read (yet): a failed connection attempt."""


def message_event(message: MQTTMessage, protocol: str) -> dict[str, Any]:
    """The event data for one received message: its topic, payload, and key if it has one.

    The payload is parsed as JSON when it is JSON, else kept as text, else as base64.
    Messages published by an edgeos node carry the idempotency key of their effect (MQTT 5
    user property or 3.1.1 envelope); it is passed on as ``key`` for deduplication.
    """
    data: dict[str, Any] = {"topic": message.topic}
    raw = bytes(message.payload)
    try:
        payload: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            payload = raw.decode()
        except UnicodeDecodeError:
            data["payload_base64"] = base64.b64encode(raw).decode()
            return data
    key = None
    properties = getattr(message, "properties", None)
    for name, value in getattr(properties, "UserProperty", None) or []:
        if name == KEY_PROPERTY:
            key = value
    if (
        key is None
        and isinstance(payload, dict)
        and set(payload) == {"idempotency_key", "payload"}
        and isinstance(payload["idempotency_key"], str)
    ):
        key, payload = payload["idempotency_key"], payload["payload"]
    data["payload"] = payload
    if key is not None:
        data["key"] = key
    return data


class MqttSource:
    """Subscribes to a binding's topics and emits an event per message, at least once."""

    def __init__(
        self,
        name: str,
        *,
        url: str,
        subscribe: Mapping[str, MqttSubscription],
        protocol: str = "5",
        client_id: str | None = None,
        keepalive_s: int = 60,
        session_expiry_s: int = 7 * 24 * 3600,
        retry_delay: float = 1.0,
        secrets: Callable[[str], str] | None = None,
    ) -> None:
        """``secrets(name)`` fills ``${secret:NAME}`` in the URL's user and password before
        every connection and reconnection: the vault as far as the binding's scopes allow."""
        self.name = name
        self._secrets = secrets
        self.subscribe = dict(subscribe)
        self.protocol = protocol
        self.client_id = client_id
        self.keepalive_s = keepalive_s
        self.session_expiry_s = session_expiry_s
        self.retry_delay = retry_delay
        self._host, self._port, self._username, self._password = mqtt_address(url)
        self._shown_url = _shown(url)
        self._client: Client | None = None
        self._queue: asyncio.Queue[MQTTMessage] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._failing = False

    @classmethod
    def from_config(
        cls, config: MqttConnectorConfig, secrets: Callable[[str], str] | None = None
    ) -> MqttSource:
        """The source for a validated binding's ``subscribe`` part."""
        return cls(
            config.name,
            url=config.url,
            secrets=secrets,
            subscribe=config.subscribe,
            protocol=config.protocol,
            client_id=config.client_id,
            keepalive_s=config.keepalive_s,
        )

    async def start(self, emit: EventSink) -> None:
        """Connect in the background (retrying while the broker is down) and emit events."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        persistent = self.client_id is not None
        kwargs: dict[str, Any] = {"manual_ack": True, "reconnect_on_failure": True}
        if self.protocol != "5":
            kwargs["clean_session"] = not persistent
        client = _new_client(
            self.client_id or f"edgeos-sub-{uuid.uuid4().hex[:12]}",
            protocol=self.protocol,
            username=None,
            password=None,
            **kwargs,
        )
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        filters = {s.topic for s in self.subscribe.values()}

        def on_pre_connect(c: Client, _: Any) -> None:
            # paho reconnects on its own: the credentials are read from the vault before
            # each attempt, so a rotated or newly granted secret is used at the next one.
            try:
                username, password = _credentials(
                    self._username, self._password, self._secrets, binding=self.name,
                    operation="subscribe",
                )  # fmt: skip
            except DeliveryError as exc:
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "mqtt source '%s': cannot connect to %s: %s; retrying in the background",
                        self.name, self._shown_url, exc.problem,
                    )  # fmt: skip
                # An OSError is what paho's loop takes for a failed attempt: it waits and
                # tries again (asking the vault again) instead of ending its thread.
                raise _NoCredentials(exc.problem) from exc
            if username is not None:
                c.username_pw_set(username, password)

        def on_connect(
            c: Client, _: Any, flags: ConnectFlags, reason: ReasonCode, props: Any
        ) -> None:
            if reason.is_failure:
                log.warning("mqtt source '%s': %s refused: %s", self.name, self._shown_url, reason)
                return
            if self._failing:
                log.info("mqtt source '%s': connected to %s again", self.name, self._shown_url)
            self._failing = False
            # Subscribing again on every connection: a clean session forgot them.
            c.subscribe([(topic, 1) for topic in sorted(filters)])

        def on_subscribe(c: Client, _: Any, mid: int, codes: list[ReasonCode], p: Any) -> None:
            for topic, code in zip(sorted(filters), codes, strict=False):
                if code.is_failure:
                    log.error(
                        "mqtt source '%s': subscribing to %r refused: %s", self.name, topic, code
                    )
            _call(loop, self._subscribed.set)

        def on_connect_fail(c: Client, _: Any) -> None:
            if not self._failing:
                self._failing = True
                log.warning(
                    "mqtt source '%s': cannot connect to %s; retrying in the background",
                    self.name, self._shown_url,
                )  # fmt: skip

        def on_message(c: Client, _: Any, message: MQTTMessage) -> None:
            _call(loop, self._queue.put_nowait, message)

        client.on_pre_connect = on_pre_connect
        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_connect_fail = on_connect_fail
        client.on_message = on_message
        properties = None
        if self.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            # Kept by the broker after a disconnect only for a named (persistent) client.
            properties.SessionExpiryInterval = self.session_expiry_s if persistent else 0
        from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY

        client.connect_async(
            self._host,
            self._port,
            self.keepalive_s,
            # 3.1.1 takes clean_session at construction and refuses anything else here.
            clean_start=not persistent if self.protocol == "5" else MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        client.loop_start()
        self._client = client
        self._task = loop.create_task(self._consume(client, emit), name=f"edgeos-mqtt-{self.name}")

    async def ready(self, timeout: float = 10.0) -> None:
        """Wait until the subscriptions are in place (for tests and health checks)."""
        await asyncio.wait_for(self._subscribed.wait(), timeout)

    async def stop(self) -> None:
        """Disconnect. Messages received but not yet emitted were not acknowledged: a
        persistent session gets them again on the next start. Safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(_shut, client)

    async def _consume(self, client: Client, emit: EventSink) -> None:
        # One message at a time, in order: MQTT requires QoS 1 acknowledgements in the
        # order the messages came, and an agent sees readings in the order they were sent.
        by_filter = [(s.topic, event) for event, s in self.subscribe.items()]
        from paho.mqtt.client import topic_matches_sub

        while True:
            message = await self._queue.get()
            data = message_event(message, self.protocol)
            events = [e for topic, e in by_filter if topic_matches_sub(topic, message.topic)]
            for event in events:
                await self._emit(emit, event, data)
            if message.qos > 0:
                client.ack(message.mid, message.qos)

    async def _emit(self, emit: EventSink, event: str, data: dict[str, Any]) -> None:
        """Emit until it works: the message is only acknowledged after it did."""
        delay = self.retry_delay
        while True:
            try:
                await emit(event, data)
                return
            except Exception:
                log.exception(
                    "mqtt source '%s': emitting %r failed; trying again in %.1f s",
                    self.name, event, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
