"""The conformance suite (edgeos.connectors.conformance) against every built-in connector
and the example plugin, each bound to a contract and to a real service on loopback.

Services: an HTTP API that deduplicates by Idempotency-Key, an SQLite file, PostgreSQL
when ``EDGEOS_TEST_POSTGRES_URL`` is set, Mosquitto when ``EDGEOS_TEST_MQTT_URL`` is set,
an SMTP server (aiosmtpd), a folder, and the echo service of the example plugin, which is
registered the way ``pip install`` would: a ``.dist-info`` folder with its entry points on
``sys.path``, found through importlib.metadata. Plugin loading and its errors are tested
at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socketserver
import sqlite3
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiosmtpd.controller import Controller

from edgeos.connectors import Connector, DeliveryWorker, build, build_all, parse_connectors
from edgeos.connectors.conformance import (
    CHECKS,
    SOURCE_CHECKS,
    SourceSubject,
    Subject,
    run_all,
    run_check,
)
from edgeos.connectors.contracts import Contract
from edgeos.connectors.events import Source, sources_of
from edgeos.connectors.filedrop import file_name
from edgeos.connectors.mqtt import MqttSource
from edgeos.errors import ConfigError, ManifestError
from edgeos.state import Database, journal, outbox
from edgeos.state.outbox import OutboxEntry
from tests.test_connectors import POSTGRES_URL, Receiver, closed_port, run, with_search_path
from tests.test_connectors_mqtt import MQTT_URL, Listener, publish
from tests.test_connectors_smtp import MailStore

PLUGIN_DIR = Path(__file__).parent / "plugins" / "edgeos_echo_connector"

ORDER = {
    "type": "object",
    "required": ["sku", "qty"],
    "properties": {
        "sku": {"type": "string"},
        "qty": {"type": "integer", "minimum": 1},
        "ref": {"type": "string"},
    },
    "additionalProperties": False,
}
BAD_ORDER = {"sku": "A-1", "qty": 0}
MAIL = {
    "type": "object",
    "required": ["to", "subject", "body"],
    "properties": {"to": {"type": "string"}, "subject": {"type": "string"},
                   "body": {"type": "string"}},
    "additionalProperties": False,
}  # fmt: skip


def contract(
    capability: str, operation: str, input: dict[str, Any], required: list[str], *,
    idempotent: bool,
) -> Contract:  # fmt: skip
    """A contract of one operation with side effects, whose result has ``required``."""
    return Contract.model_validate(
        {
            "capability": capability,
            "version": "1.0.0",
            "operations": {
                operation: {
                    "input": input,
                    "output": {"type": "object", "required": required},
                    "side_effect": True,
                    "idempotent": idempotent,
                    "timeout": "5s",
                }
            },
        }
    )


def binding(name: str, body: dict[str, Any]) -> Callable[[], Connector]:
    """A connector factory that goes through connectors.yaml's loader, like a node."""
    return lambda: build(parse_connectors({name: body}, "connectors.yaml")[name])


def order(key: str) -> dict[str, Any]:
    return {"sku": "A-1", "qty": 3, "ref": key}


# -- services -----------------------------------------------------------------------------
class _Server(socketserver.ThreadingTCPServer):
    """A TCP server on loopback, served from a thread; ``stop`` ends every connection."""

    daemon_threads = True

    def __init__(self, handler: type[socketserver.BaseRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self._thread.join(5)


class _Silent(socketserver.BaseRequestHandler):
    """Takes the connection and says nothing until the server stops."""

    server: _Server

    def handle(self) -> None:
        self.server.stopping.wait(10)


class EchoService(_Server):
    """The example plugin's service: answers each JSON line, applying each key once, and
    serves its feed of notes from a position on."""

    def __init__(self) -> None:
        super().__init__(_EchoHandler)
        self.seen: set[str] = set()
        self.applied: list[str] = []
        self.feed: list[dict[str, Any]] = []

    def note(self, channel: str, data: dict[str, Any]) -> None:
        with self.lock:
            self.feed.append({"seq": len(self.feed), "channel": channel, "data": data})


class _EchoHandler(socketserver.StreamRequestHandler):
    server: EchoService

    def handle(self) -> None:
        line = self.rfile.readline()
        if not line:
            return
        request = json.loads(line)
        if "poll" in request:
            with self.server.lock:
                notes = self.server.feed[request["poll"] :]
            self.wfile.write(json.dumps({"notes": notes}).encode() + b"\n")
            return
        key = request["key"]
        with self.server.lock:
            fresh = key not in self.server.seen
            self.server.seen.add(key)
            if fresh:
                self.server.applied.append(key)
        reply = {"applied": fresh, "echo": request["payload"]}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


@pytest.fixture
def silent() -> Iterator[_Server]:
    server = _Server(_Silent)
    try:
        yield server
    finally:
        server.stop()


def register(monkeypatch: pytest.MonkeyPatch, site: Path, project: Path = PLUGIN_DIR) -> None:
    """Install a plugin project the way pip makes it visible: its package importable and
    a ``.dist-info`` folder with its entry points (from its pyproject.toml) on sys.path."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    dist = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    groups = [
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
        for group, points in meta["entry-points"].items()
    ]
    (dist / "entry_points.txt").write_text("\n".join(groups))
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.syspath_prepend(str(site))  # also invalidates importlib's caches


@pytest.fixture
def echo_plugin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    register(monkeypatch, tmp_path / "site")


# -- the subjects -------------------------------------------------------------------------
def http_subject(request: pytest.FixtureRequest) -> Subject:
    receiver = Receiver()
    request.addfinalizer(receiver.stop)
    silent = request.getfixturevalue("silent")

    def body(url: str) -> dict[str, Any]:
        return {"type": "http", "base_url": url, "timeout_s": 5,
                "operations": {"reorder": {"method": "POST", "path": "/orders"}}}  # fmt: skip

    async def applied(key: str) -> int:
        with receiver.lock:
            return sum(1 for a in receiver.applied if a["key"] == key)

    return Subject(
        "http",
        contract("supplier", "reorder", ORDER, ["status", "body"], idempotent=True),
        "reorder", order, BAD_ORDER, "/qty",
        make=binding("supplier", body(receiver.url)),
        make_down=binding("supplier", body(f"http://127.0.0.1:{closed_port()}")),
        applied=applied,
        make_stalled=binding("supplier", body(f"http://127.0.0.1:{silent.port}")),
    )  # fmt: skip


SQL_STATEMENT = "INSERT INTO orders (sku, qty, ref) VALUES (:sku, :qty, :ref)"


def sql_body(url: str, timeout: float = 5) -> dict[str, Any]:
    return {"type": "sql", "url": url, "timeout_s": timeout,
            "operations": {"reorder": {"statement": SQL_STATEMENT}}}  # fmt: skip


def sql_contract() -> Contract:
    return contract("store", "reorder", ORDER, ["duplicate"], idempotent=True)


def sqlite_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Subject:
    path = tmp_path / "store.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (sku TEXT NOT NULL, qty INTEGER NOT NULL, ref TEXT)")
    conn.close()
    url = f"sqlite:///{path}"

    async def applied(key: str) -> int:
        conn = sqlite3.connect(path)
        try:
            (count,) = conn.execute("SELECT count(*) FROM orders WHERE ref = ?", (key,)).fetchone()
        finally:
            conn.close()
        return int(count)

    def stalled() -> Connector:
        # Another writer holds the database: SQLite waits for it as long as timeout_s.
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")
        request.addfinalizer(holder.close)
        return binding("store", sql_body(url, timeout=0.3))()

    return Subject(
        "sqlite", sql_contract(), "reorder", order, BAD_ORDER, "/qty",
        make=binding("store", sql_body(url)),
        make_down=binding("store", sql_body(f"sqlite:///{tmp_path / 'not-mounted' / 's.db'}")),
        applied=applied, make_stalled=stalled,
    )  # fmt: skip


def postgres_subject(request: pytest.FixtureRequest) -> Subject:
    if not POSTGRES_URL:
        pytest.skip(
            "EDGEOS_TEST_POSTGRES_URL is not set: no PostgreSQL to test against "
            "(run `python -m tests.services pytest ...` to use one on loopback)"
        )
    import psycopg

    admin_url = POSTGRES_URL
    schema = f"edgeos_conf_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        admin.execute(f'CREATE TABLE "{schema}".orders (sku TEXT NOT NULL, qty INT, ref TEXT)')

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')

    request.addfinalizer(drop)
    url = with_search_path(admin_url, schema)

    async def applied(key: str) -> int:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM orders WHERE ref = %s", (key,)).fetchone()
        return int(row[0]) if row else 0

    def stalled() -> Connector:
        # A lock on the table: the statement waits until statement_timeout (timeout_s).
        holder = psycopg.connect(url)
        holder.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        request.addfinalizer(holder.close)
        return binding("store", sql_body(url, timeout=0.3))()

    return Subject(
        "postgres", sql_contract(), "reorder", order, BAD_ORDER, "/qty",
        make=binding("store", sql_body(url)),
        make_down=binding(
            "store", sql_body(f"postgresql://postgres@127.0.0.1:{closed_port()}/test")
        ),
        applied=applied, make_stalled=stalled,
    )  # fmt: skip


def mqtt_subject(request: pytest.FixtureRequest) -> Subject:
    if not MQTT_URL:
        pytest.skip(
            "EDGEOS_TEST_MQTT_URL is not set: no MQTT broker to test against "
            "(run `python -m tests.services pytest ...` to use Mosquitto on loopback)"
        )
    prefix = f"edgeos-conformance/{uuid.uuid4().hex[:12]}"
    listener = Listener(MQTT_URL, f"{prefix}/#")
    request.addfinalizer(listener.stop)
    silent = request.getfixturevalue("silent")

    def body(url: str, timeout: float = 5) -> dict[str, Any]:
        return {"type": "mqtt", "url": url, "timeout_s": timeout,
                "operations": {"reorder": {"topic": f"{prefix}/orders"}}}  # fmt: skip

    async def applied(key: str) -> int:
        # Messages reach the subscriber shortly after the broker's PUBACK.
        deadline = time.monotonic() + 1.0
        while True:
            with listener.lock:
                count = sum(1 for m in listener.messages if m.key == key)
            if count or time.monotonic() > deadline:
                await asyncio.sleep(0.05)  # and a repeat, if there is one
                with listener.lock:
                    return sum(1 for m in listener.messages if m.key == key)
            await asyncio.sleep(0.01)

    return Subject(
        "mqtt",
        # The broker forwards repeats: not idempotent, whatever subscribers do with keys.
        contract("plant", "reorder", ORDER, ["topic"], idempotent=False),
        "reorder", order, BAD_ORDER, "/qty",
        make=binding("plant", body(MQTT_URL)),
        make_down=binding("plant", body(f"mqtt://127.0.0.1:{closed_port()}")),
        applied=applied,
        make_stalled=binding("plant", body(f"mqtt://127.0.0.1:{silent.port}", timeout=0.3)),
    )  # fmt: skip


def smtp_subject(request: pytest.FixtureRequest) -> Subject:
    store = MailStore()
    port = closed_port()
    controller = Controller(store, hostname="127.0.0.1", port=port)
    controller.start()
    request.addfinalizer(controller.stop)
    silent = request.getfixturevalue("silent")

    def body(port: int, timeout: float = 5) -> dict[str, Any]:
        return {"type": "smtp", "host": "127.0.0.1", "port": port, "timeout_s": timeout,
                "from": "edge-42@shop.example", "operations": {"send": {}}}  # fmt: skip

    def mail(key: str) -> dict[str, Any]:
        return {"to": "buyer@supplier.example", "subject": "Reorder A-1", "body": "3 of A-1\n"}

    async def applied(key: str) -> int:
        with store.lock:
            return sum(1 for m in store.received if m["X-Idempotency-Key"] == key)

    return Subject(
        "smtp",
        contract("messaging", "send", MAIL, ["message_id"], idempotent=False),
        "send", mail, {"to": "buyer@supplier.example", "subject": 7, "body": "x"}, "/subject",
        make=binding("mail", body(port)),
        make_down=binding("mail", body(closed_port())),
        applied=applied,
        make_stalled=binding("mail", body(silent.port, timeout=0.3)),
    )  # fmt: skip


def files_subject(tmp_path: Path) -> Subject:
    folder = tmp_path / "export"
    folder.mkdir()

    def body(path: Path) -> dict[str, Any]:
        return {"type": "files", "operations": {"reorder": {"path": str(path)}}}

    async def applied(key: str) -> int:
        path = folder / file_name(key)
        if not path.exists():
            return 0
        return int(orjson.loads(path.read_bytes())["idempotency_key"] == key)

    return Subject(
        "files", contract("erp", "reorder", ORDER, ["file"], idempotent=True),
        "reorder", order, BAD_ORDER, "/qty",
        make=binding("erp", body(folder)),
        make_down=binding("erp", body(tmp_path / "not-mounted")),
        applied=applied,
    )  # fmt: skip


def echo_subject(request: pytest.FixtureRequest) -> Subject:
    request.getfixturevalue("echo_plugin")
    service = EchoService()
    request.addfinalizer(service.stop)
    silent = request.getfixturevalue("silent")
    text = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}

    def body(port: int, timeout: float = 5) -> dict[str, Any]:
        return {"type": "echo", "port": port, "timeout_s": timeout, "operations": {"say": {}}}

    async def applied(key: str) -> int:
        with service.lock:
            return service.applied.count(key)

    return Subject(
        "plugin echo", contract("echo", "say", text, ["echo"], idempotent=True),
        "say", lambda key: {"text": "hello"}, {"text": 5}, "/text",
        make=binding("relay", body(service.port)),
        make_down=binding("relay", body(closed_port())),
        applied=applied,
        make_stalled=binding("relay", body(silent.port, timeout=0.3)),
    )  # fmt: skip


SUBJECTS = ["http", "sqlite", "postgres", "mqtt", "smtp", "files", "echo"]


@pytest.fixture(params=SUBJECTS)
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Subject:
    kind = request.param
    if kind == "sqlite":
        return sqlite_subject(request, tmp_path)
    if kind == "files":
        return files_subject(tmp_path)
    makers = {"http": http_subject, "postgres": postgres_subject, "mqtt": mqtt_subject,
              "smtp": smtp_subject, "echo": echo_subject}  # fmt: skip
    return makers[kind](request)


# -- the sense side: event sources --------------------------------------------------------
NOTE = {"type": "object", "required": ["note"], "properties": {"note": {"type": "string"}}}


def events_contract(capability: str, event: str, data: dict[str, Any]) -> Contract:
    return Contract.model_validate(
        {"capability": capability, "version": "1.0", "events": {event: {"data": data}}}
    )


def source_binding(name: str, body: dict[str, Any], state_dir: Path) -> Callable[[], Source]:
    """A source factory that goes through connectors.yaml's loader, like a node."""

    def make() -> Source:
        (source,) = sources_of(parse_connectors({name: body}, "connectors.yaml"),
                               state_dir=state_dir)  # fmt: skip
        if isinstance(source, MqttSource):
            source.retry_delay = 0.05  # a failed emit is tried again soon
        return source

    return make


def files_source_subject(tmp_path: Path) -> SourceSubject:
    sales = tmp_path / "exports" / "sales.csv"
    sales.parent.mkdir()
    sales.write_text("note,qty\n")

    def body(path: Path) -> dict[str, Any]:
        return {"type": "files", "interval": "50ms",
                "watch": {"pos.sales": {"path": str(path), "csv": True}}}  # fmt: skip

    async def send(token: str) -> None:
        with sales.open("a") as out:
            out.write(f"{token},3\n")

    row = {"type": "object", "required": ["row"],
           "properties": {"row": {"type": "object", "required": ["note", "qty"]}}}  # fmt: skip
    return SourceSubject(
        "files source", events_contract("pos", "sales", row), "pos.sales",
        make=source_binding("pos", body(sales), tmp_path / "state"),
        make_down=source_binding("pos", body(tmp_path / "not-mounted" / "s.csv"),
                                 tmp_path / "state-down"),
        send=send,
    )  # fmt: skip


def mqtt_source_subject(request: pytest.FixtureRequest, tmp_path: Path) -> SourceSubject:
    if not MQTT_URL:
        pytest.skip(
            "EDGEOS_TEST_MQTT_URL is not set: no MQTT broker to test against "
            "(run `python -m tests.services pytest ...` to use Mosquitto on loopback)"
        )
    broker = MQTT_URL
    topic = f"edgeos-conformance/{uuid.uuid4().hex[:12]}/alarm"

    def body(url: str) -> dict[str, Any]:
        return {"type": "mqtt", "url": url, "subscribe": {"plant.alarm": {"topic": topic}}}

    async def send(token: str) -> None:
        await asyncio.to_thread(publish, broker, topic, orjson.dumps({"note": token}))

    async def ready(source: Source) -> None:
        assert isinstance(source, MqttSource)
        await source.ready()

    message = {"type": "object", "required": ["topic", "payload"],
               "properties": {"payload": NOTE}}  # fmt: skip
    return SourceSubject(
        "mqtt source", events_contract("plant", "alarm", message), "plant.alarm",
        make=source_binding("plant", body(broker), tmp_path / "state"),
        make_down=source_binding("plant", body(f"mqtt://127.0.0.1:{closed_port()}"),
                                 tmp_path / "state"),
        send=send, ready=ready,
    )  # fmt: skip


def echo_source_subject(request: pytest.FixtureRequest, tmp_path: Path) -> SourceSubject:
    request.getfixturevalue("echo_plugin")
    service = EchoService()
    request.addfinalizer(service.stop)

    def body(port: int) -> dict[str, Any]:
        return {"type": "echo", "port": port, "poll_s": 0.05, "timeout_s": 2,
                "subscribe": {"echo.heard": {"channel": "notes"}}}  # fmt: skip

    async def send(token: str) -> None:
        service.note("notes", {"note": token})
        service.note("other", {"note": f"not for this binding: {token}"})

    return SourceSubject(
        "plugin echo source", events_contract("echo", "heard", NOTE), "echo.heard",
        make=source_binding("relay", body(service.port), tmp_path / "state"),
        make_down=source_binding("relay", body(closed_port()), tmp_path / "state-down"),
        send=send,
    )  # fmt: skip


@pytest.fixture(params=["files", "mqtt", "echo"])
def source_subject(request: pytest.FixtureRequest, tmp_path: Path) -> SourceSubject:
    if request.param == "files":
        return files_source_subject(tmp_path)
    if request.param == "mqtt":
        return mqtt_source_subject(request, tmp_path)
    return echo_source_subject(request, tmp_path)


# -- the suite ----------------------------------------------------------------------------
@pytest.mark.parametrize("check", list(CHECKS))
def test_conformance(subject: Subject, check: str) -> None:
    skipped = run(run_check(check, subject))
    if skipped is not None:
        pytest.skip(skipped)


@pytest.mark.parametrize("check", list(SOURCE_CHECKS))
def test_source_conformance(source_subject: SourceSubject, check: str) -> None:
    skipped = run(run_check(check, source_subject))
    if skipped is not None:
        pytest.skip(skipped)


def test_the_suite_reports_a_connector_that_breaks_the_rules(tmp_path: Path) -> None:
    """A connector that swallows its service's failure and answers nonsense is caught."""

    class Careless:
        name = "careless"

        async def deliver(self, operation: str, payload: dict[str, Any], key: str) -> Any:
            if operation != "reorder":
                raise KeyError(operation)  # not a DeliveryError
            return {"status": 200}

        async def close(self) -> None:
            return None

    async def nothing(key: str) -> int:
        return 0

    subject = Subject(
        "careless", contract("supplier", "reorder", ORDER, ["status"], idempotent=True),
        "reorder", order, BAD_ORDER, "/qty", make=Careless, make_down=Careless, applied=nothing,
    )  # fmt: skip
    outcomes = {o.check: o for o in run(run_all(subject))}
    assert outcomes["input_refused_before_io"].passed  # the boundary refused it
    assert "applied the effect 0 times" in (outcomes["delivers"].problem or "")
    assert "raised KeyError" in (outcomes["unknown_operation"].problem or "")
    assert "expected a DeliveryError" in (outcomes["down_is_retryable"].problem or "")
    assert outcomes["timeout_honoured"].skipped


def test_the_suite_reports_a_source_that_breaks_the_rules() -> None:
    """A source that raises when its service is down, emits under another name, drops an
    event its sink failed and keeps emitting after stop is caught."""
    made: list[Careless] = []

    class Careless:
        name = "careless"

        def __init__(self, down: bool = False) -> None:
            self.down = down
            self.emit: Any = None
            made.append(self)

        async def start(self, emit: Any) -> None:
            if self.down:
                raise ConnectionRefusedError("the service is down")
            self.emit = emit

        async def stop(self) -> None:
            return None  # and keeps its sink

    async def send(token: str) -> None:
        for source in made:
            if source.emit is not None:
                with contextlib.suppress(RuntimeError):  # dropped, never tried again
                    await source.emit("echo.said", {"note": token})

    subject = SourceSubject(
        "careless source", events_contract("echo", "heard", NOTE), "echo.heard",
        make=Careless, make_down=lambda: Careless(down=True), send=send, latency=0.3,
    )  # fmt: skip
    outcomes = {o.check: o for o in run(run_all(subject))}
    assert "emitted as 'echo.said', not 'echo.heard'" in (outcomes["source_emits"].problem or "")
    assert "no event carrying" in (outcomes["source_retries_failed_emit"].problem or "")
    assert "start raised ConnectionRefusedError" in (
        outcomes["source_down_starts_promptly"].problem or ""
    )
    assert "a stopped source still emitted" in (outcomes["source_stop_is_safe"].problem or "")


# -- plugins ------------------------------------------------------------------------------
RELAY = {"type": "echo", "port": 7007, "operations": {"say": {}}}


def test_a_plugin_type_is_found_through_its_entry_point(echo_plugin: None) -> None:
    configs = parse_connectors({"relay": RELAY}, "connectors.yaml")
    config = configs["relay"]
    assert type(config).__name__ == "EchoConfig"
    connector = build_all(configs)["relay"]
    assert type(connector).__name__ == "EchoConnector"
    assert isinstance(connector, Connector)


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({**RELAY, "port": 0}, "relay.port", "greater than or equal to 1"),
        ({**RELAY, "colour": "red"}, "relay.colour", "unknown field"),
        ({**RELAY, "operations": {"say": {"loud": True}}}, "relay.operations.say.loud",
         "unknown field"),
        ({**RELAY, "operations": {"s.ay": {}}}, "relay.operations", "operation name 's.ay'"),
        ({**RELAY, "scopes": ["bad scope"]}, "relay.scopes", "scope 'bad scope'"),
        ({**RELAY, "operations": {}}, "relay", "needs operations (effects) or subscribe"),
        ({**RELAY, "subscribe": {"bad event!": {"channel": "x"}}}, "relay.subscribe",
         "event name 'bad event!'"),
        ({**RELAY, "subscribe": {"echo.heard": {}}}, "relay.subscribe.echo.heard.channel",
         "required"),
    ],
)  # fmt: skip
def test_a_plugin_binding_is_validated_like_a_built_in(
    echo_plugin: None, body: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(ManifestError) as info:
        parse_connectors({"relay": body}, "connectors.yaml")
    assert f"field '{field}'" in str(info.value)
    assert reason in str(info.value)


def test_an_unknown_type_lists_the_built_ins_and_the_plugins(echo_plugin: None) -> None:
    with pytest.raises(ManifestError) as info:
        parse_connectors({"relay": {**RELAY, "type": "ftp"}}, "connectors.yaml")
    message = str(info.value)
    assert "field 'relay.type': unknown connector type 'ftp'" in message
    assert "built in: http, sql, mqtt, files, smtp" in message
    assert "plugins: echo" in message


BAD_PLUGINS = """\
from edgeos.connectors import PluginBinding


class NoFactory:
    config_model = PluginBinding


class WrongModel:
    config_model = dict

    @classmethod
    def from_config(cls, config, secrets):
        raise AssertionError("never called")


class Builds:
    @classmethod
    def from_config(cls, config, secrets):
        return object()


class Fails:
    @classmethod
    def from_config(cls, config, secrets):
        raise ValueError("no port given")


class Deaf:
    @staticmethod
    def source_from_config(setup):
        return object()


class OnlyListens:
    @staticmethod
    def source_from_config(setup):
        raise ValueError("no channel given")
"""


@pytest.fixture
def bad_plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    project = tmp_path / "bad"
    (project / "edgeos_bad_plugins").mkdir(parents=True)
    (project / "edgeos_bad_plugins" / "__init__.py").write_text(BAD_PLUGINS)
    (project / "pyproject.toml").write_text(
        '[project]\nname = "edgeos-bad-plugins"\nversion = "1.0"\n'
        '[project.entry-points."edgeos.connectors"]\n'
        'missing = "edgeos_no_such_module:Connector"\n'
        'nofactory = "edgeos_bad_plugins:NoFactory"\n'
        'wrongmodel = "edgeos_bad_plugins:WrongModel"\n'
        'builds = "edgeos_bad_plugins:Builds"\n'
        'fails = "edgeos_bad_plugins:Fails"\n'
        'deaf = "edgeos_bad_plugins:Deaf"\n'
        'listens = "edgeos_bad_plugins:OnlyListens"\n'
        'http = "edgeos_bad_plugins:Builds"\n'
    )
    register(monkeypatch, tmp_path / "site", project)
    yield
    sys.modules.pop("edgeos_bad_plugins", None)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "connector plugin 'missing' (edgeos_no_such_module:Connector) cannot be "
                    "loaded: ModuleNotFoundError"),
        ("nofactory", "has no from_config(config, secrets) for effects, nor "
                      "source_from_config(setup) for events"),
        ("wrongmodel", "config_model must be a subclass of"),
    ],
)  # fmt: skip
def test_a_broken_plugin_is_refused_at_load_naming_it(
    bad_plugins: None, kind: str, reason: str
) -> None:
    with pytest.raises(ManifestError) as info:
        parse_connectors({"relay": {"type": kind, "operations": {"say": {}}}}, "connectors.yaml")
    assert "field 'relay.type': connector plugin" in str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("builds", "built a object, not a Connector"),
        ("fails", "failed: ValueError: no port given"),
    ],
)
def test_a_plugin_that_cannot_build_its_connector_names_plugin_and_binding(
    bad_plugins: None, kind: str, reason: str
) -> None:
    configs = parse_connectors({"relay": {"type": kind, "operations": {"say": {}}}}, "test")
    with pytest.raises(ConfigError, match=f"connector plugin '{kind}'.*binding 'relay'") as info:
        build(configs["relay"])
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("kind", "body", "reason"),
    [
        ("builds", {"subscribe": {"heard": {}}}, "emits no events (no source_from_config)"),
        ("deaf", {"subscribe": {"heard": {}}}, "built a object, not a Source"),
        ("listens", {"subscribe": {"heard": {}}}, "failed: ValueError: no channel given"),
        ("listens", {"operations": {"say": {}}}, "takes no effects (it has no from_config)"),
    ],
)
def test_a_plugin_that_cannot_build_its_source_names_plugin_and_binding(
    bad_plugins: None, tmp_path: Path, kind: str, body: dict[str, Any], reason: str
) -> None:
    configs = parse_connectors({"relay": {"type": kind, **body}}, "test")

    def build_it() -> object:
        if "subscribe" in body:
            return sources_of(configs, state_dir=tmp_path)
        return build_all(configs)

    with pytest.raises(ConfigError, match=f"connector plugin '{kind}'.*binding 'relay'") as info:
        build_it()
    assert reason in str(info.value)


def test_a_plugin_cannot_replace_a_built_in_type(bad_plugins: None) -> None:
    configs = parse_connectors(
        {"supplier": {"type": "http", "base_url": "http://127.0.0.1:9",
                      "operations": {"o": {"path": "/o"}}}}, "test",
    )  # fmt: skip
    assert type(build(configs["supplier"])).__name__ == "HttpConnector"


def test_a_plugin_delivers_through_the_worker(echo_plugin: None, db: Database) -> None:
    service = EchoService()
    entry = OutboxEntry("run1:0:0", "run1", "relay", "say", {"text": "hi"})
    with db.transaction() as conn:
        outbox.enqueue(conn, entry, at=0.0)

    async def go() -> None:
        configs = parse_connectors({"relay": {**RELAY, "port": service.port}}, "test")
        connectors = build_all(configs)
        worker = DeliveryWorker(db, connectors)
        try:
            await worker.drain_once()
        finally:
            await connectors["relay"].close()

    try:
        run(go())
    finally:
        service.stop()
    assert service.applied == ["run1:0:0"]
    delivered = outbox.get(db, "run1:0:0")
    assert delivered is not None
    assert delivered.state == "delivered"
    assert [r.kind for r in journal.for_run(db, "run1")] == ["effect_delivered"]
