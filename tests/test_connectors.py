"""Connectors: one conformance suite run against every built-in connector, then the
connector-specific rules (HTTP status mapping, Retry-After, SQL placeholders) and the
``connectors.yaml`` loader.

Everything is real: an HTTP server on loopback that deduplicates by Idempotency-Key like
a well-behaved API, an SQLite file, and PostgreSQL when ``EDGEOS_TEST_POSTGRES_URL`` is
set (``python -m tests.services pytest ...`` sets it when a server answers).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import orjson
import pytest

from edgeos.connectors import (
    Connector,
    DeliveryError,
    HttpConnectorConfig,
    SqlConnectorConfig,
    UnknownOperation,
    build,
    load_connectors,
    parse_connectors,
)
from edgeos.connectors.http import (
    MAX_RETRY_AFTER,
    HttpConnector,
    classify_conflict,
    parse_retry_after,
)
from edgeos.connectors.sql import SqlConnector, placeholders, to_pyformat
from edgeos.errors import ManifestError
from tests.loopback import LoopbackServer, QuietHandler

T = TypeVar("T")
POSTGRES_URL = os.environ.get("EDGEOS_TEST_POSTGRES_URL")


# -- a real HTTP receiver ---------------------------------------------------------------
@dataclass
class Seen:
    """One request as the receiver saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


class Receiver(LoopbackServer):
    """An HTTP API on loopback that applies orders once per Idempotency-Key.

    Like the idempotency-key draft: a repeated key gets the stored answer replayed (or,
    on ``/orders409``, a 409 saying the key was already used); a key whose first request
    is still being processed gets 409 "in progress". Other paths answer with one fixed
    failure each, so tests can ask for a status by path.
    """

    def __init__(self) -> None:
        super().__init__(_Handler)
        self.lock = threading.Lock()
        self.requests: list[Seen] = []
        self.applied: list[dict[str, Any]] = []
        self.replies: dict[str, tuple[int, dict[str, Any]]] = {}
        self.in_progress: set[str] = set()
        self.failures: dict[str, int] = defaultdict(int)
        #: /hold waits for this before applying.
        self.release = threading.Event()
        self.active = 0
        self.max_active = 0

    @property
    def url(self) -> str:
        return self.base_url

    def stop(self) -> None:
        self.release.set()
        super().stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (a cancelled delivery) is expected here: stay quiet."""

    def seen(self, path: str) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def respond(self, path: str, key: str | None, body: Any) -> tuple[int, Any, dict[str, str]]:
        """The answer for one request: (status, JSON body or text, headers)."""
        fixed: dict[str, tuple[int, Any, dict[str, str]]] = {
            "/bad": (400, {"error": "unknown sku"}, {}),
            "/always503": (503, {"error": "down for maintenance"}, {}),
            "/gateway504": (504, {"error": "the upstream did not answer"}, {}),
            "/ratelimit": (429, {"error": "slow down"}, {"Retry-After": "3"}),
            "/timeout408": (408, {"error": "request timeout"}, {}),
            "/conflict": (409, {"error": "sku A-1 is discontinued"}, {}),
            "/inprogress": (
                409,
                {"error": "a request with this Idempotency-Key is in progress"},
                {"Retry-After": "2"},
            ),
            "/redirect": (302, "", {"Location": "/orders"}),
            "/text": (200, "x" * 5000, {}),
            "/empty": (204, "", {}),
        }
        if path in fixed:
            return fixed[path]
        if path == "/busy":
            return 503, {"error": "busy"}, {"Retry-After": str(body["retry_after"])}
        if key is None:
            return 400, {"error": "Idempotency-Key header required"}, {}
        if path == "/flaky":
            with self.lock:
                self.failures[key] += 1
                if self.failures[key] <= int(body.get("fail", 2)):
                    return 503, {"error": f"failure {self.failures[key]}"}, {}
        if isinstance(body, dict) and int(body.get("qty", 1)) < 0:
            return 400, {"error": "qty must be positive"}, {}
        with self.lock:
            if key in self.replies:
                if path == "/orders409":
                    return 409, {"error": f"idempotency key {key} already used"}, {}
                status, reply = self.replies[key]
                return status, reply, {"Idempotent-Replayed": "true"}
            if key in self.in_progress:
                return 409, {"error": "request with this idempotency key is in progress"}, {}
            self.in_progress.add(key)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if path == "/hold":
                self.release.wait(10)
            elif path == "/slow":
                time.sleep(0.05)
        finally:
            with self.lock:
                self.active -= 1
        with self.lock:
            self.applied.append({"key": key, "path": path, **body})
            reply = {"order": len(self.applied)}
            self.replies[key] = (201, reply)
            self.in_progress.discard(key)
        return 201, reply, {}


class _Handler(QuietHandler):
    protocol_version = "HTTP/1.1"
    server: Receiver

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        key = self.headers.get("Idempotency-Key")
        with self.server.lock:
            self.server.requests.append(Seen(self.command, self.path, dict(self.headers), body))
        status, reply, headers = self.server.respond(self.path, key, body)
        if isinstance(reply, str):
            data, kind = reply.encode(), "text/plain; charset=utf-8"
        else:
            data, kind = json.dumps(reply).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_PUT = do_PATCH = do_DELETE = _handle


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.stop()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@asynccontextmanager
async def opened(connector: Connector) -> AsyncIterator[Connector]:
    """Use a connector, then close it in the same event loop that opened its connections."""
    try:
        yield connector
    finally:
        await connector.close()


async def failure(connector: Connector, operation: str, payload: Any, key: str) -> DeliveryError:
    """Deliver and return the DeliveryError it must raise."""
    with pytest.raises(DeliveryError) as info:
        await connector.deliver(operation, payload, key)
    return info.value


# -- the targets of the conformance suite -----------------------------------------------
ORDERS_SQLITE = (
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, sku TEXT NOT NULL, "
    "qty INTEGER NOT NULL CHECK (qty > 0), meta TEXT)"
)
ORDERS_POSTGRES = (
    "(id SERIAL PRIMARY KEY, sku TEXT NOT NULL, qty INTEGER NOT NULL CHECK (qty > 0), meta JSONB)"
)
SQL_OPERATIONS = {
    "reorder": {"statement": "INSERT INTO orders (sku, qty) VALUES (:sku, :qty)"},
    "reorder_returning": {
        "statement": "INSERT INTO orders (sku, qty, meta) VALUES (:sku, :qty, :meta) "
        "RETURNING id, sku"
    },
    "broken": {"statement": "INSERT INTO nowhere (sku) VALUES (:sku)"},
}


@dataclass
class Target:
    """A built-in connector type, its real receiver, and how to look at what was applied."""

    kind: str
    make: Callable[[], Connector]
    make_down: Callable[[], Connector]
    applied: Callable[[], list[tuple[str, int]]]


def http_target(receiver: Receiver) -> Target:
    def config(base_url: str) -> dict[str, Any]:
        return {
            "type": "http",
            "base_url": base_url,
            "timeout_s": 2,
            "headers": {"X-Store": "42"},
            "operations": {"reorder": {"method": "POST", "path": "/orders"}},
        }

    def make(base_url: str) -> Connector:
        return build(parse_connectors({"supplier": config(base_url)}, "test")["supplier"])

    return Target(
        "http",
        lambda: make(receiver.url),
        lambda: make(f"http://127.0.0.1:{closed_port()}"),
        lambda: [(a["sku"], a["qty"]) for a in receiver.applied],
    )


def sql_config(url: str) -> dict[str, Any]:
    return {"type": "sql", "url": url, "timeout_s": 2, "operations": SQL_OPERATIONS}


def sql_make(url: str) -> Connector:
    return build(parse_connectors({"supplier": sql_config(url)}, "test")["supplier"])


def sqlite_target(tmp_path: Path) -> Target:
    path = tmp_path / "store.db"
    with sqlite3.connect(path) as conn:
        conn.execute(ORDERS_SQLITE)
    conn.close()

    def applied() -> list[tuple[str, int]]:
        conn = sqlite3.connect(path)
        try:
            return [(s, q) for s, q in conn.execute("SELECT sku, qty FROM orders ORDER BY id")]
        finally:
            conn.close()

    return Target(
        "sqlite",
        lambda: sql_make(f"sqlite:///{path}"),
        lambda: sql_make(f"sqlite:///{tmp_path / 'not-mounted' / 'store.db'}"),
        applied,
    )


def with_search_path(url: str, schema: str) -> str:
    """The URL with ``schema`` first on the search path, and as the application name
    (which lets a test find its own sessions in pg_stat_activity)."""
    options = quote(f"-c search_path={schema}")
    return f"{url}{'&' if '?' in url else '?'}options={options}&application_name={schema}"


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, str]]:
    """A fresh schema (with an ``orders`` table) for one test; dropped afterwards."""
    if not POSTGRES_URL:
        pytest.skip(
            "EDGEOS_TEST_POSTGRES_URL is not set: no PostgreSQL to test against "
            "(run `python -m tests.services pytest ...` to use one on loopback)"
        )
    import psycopg

    schema = f"edgeos_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        admin.execute(f'CREATE TABLE "{schema}".orders {ORDERS_POSTGRES}')
    try:
        yield schema, with_search_path(POSTGRES_URL, schema)
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def pg_rows(schema: str, query: str) -> list[tuple[Any, ...]]:
    import psycopg

    assert POSTGRES_URL
    with psycopg.connect(with_search_path(POSTGRES_URL, schema)) as conn:
        return list(conn.execute(query).fetchall())


def postgres_target(schema: str, url: str) -> Target:
    return Target(
        "postgres",
        lambda: sql_make(url),
        lambda: sql_make(f"postgresql://postgres@127.0.0.1:{closed_port()}/test"),
        lambda: [(s, q) for s, q in pg_rows(schema, "SELECT sku, qty FROM orders ORDER BY id")],
    )


@pytest.fixture(params=["http", "sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "http":
        return http_target(request.getfixturevalue("receiver"))
    if request.param == "sqlite":
        return sqlite_target(tmp_path)
    schema, url = request.getfixturevalue("pg_schema")
    return postgres_target(schema, url)


def order(sku: str = "A-1", qty: int = 3) -> dict[str, Any]:
    return {"sku": sku, "qty": qty}


# -- the conformance suite ----------------------------------------------------------------
def test_delivers_and_the_effect_is_applied(target: Target) -> None:
    async def go() -> dict[str, Any] | None:
        async with opened(target.make()) as connector:
            assert isinstance(connector, Connector)
            assert connector.name == "supplier"
            return await connector.deliver("reorder", order("A-1", 3), "run1:0:0")

    result = run(go())
    assert target.applied() == [("A-1", 3)]
    assert result is not None
    assert len(orjson.dumps(result)) < 2000  # small and JSON-able: it goes in the outbox


def test_redelivery_with_the_same_key_applies_once(target: Target) -> None:
    async def go() -> list[dict[str, Any] | None]:
        async with opened(target.make()) as connector:
            return [await connector.deliver("reorder", order(), "run1:0:0") for _ in range(3)]

    results = run(go())
    assert target.applied() == [("A-1", 3)]
    assert all(r is not None for r in results)


def test_concurrent_deliveries_of_one_key_apply_once(target: Target) -> None:
    async def go() -> list[Any]:
        async with opened(target.make()) as connector:
            calls = [connector.deliver("reorder", order(), "run1:0:0") for _ in range(6)]
            return list(await asyncio.gather(*calls, return_exceptions=True))

    results = run(go())
    assert target.applied() == [("A-1", 3)]
    # A receiver may answer "still in progress" to a concurrent twin: retryable, never a
    # second application.
    for result in results:
        assert not isinstance(result, BaseException) or (
            isinstance(result, DeliveryError) and result.retryable
        )


def test_a_different_key_applies_again(target: Target) -> None:
    async def go() -> None:
        async with opened(target.make()) as connector:
            await connector.deliver("reorder", order("A-1", 3), "run1:0:0")
            await connector.deliver("reorder", order("A-1", 3), "run1:0:1")
            await connector.deliver("reorder", order("B-2", 1), "run2:0:0")

    run(go())
    assert target.applied() == [("A-1", 3), ("A-1", 3), ("B-2", 1)]


def test_target_down_is_retryable(target: Target) -> None:
    async def go() -> DeliveryError:
        async with opened(target.make_down()) as connector:
            return await failure(connector, "reorder", order(), "run1:0:0")

    error = run(go())
    assert error.retryable
    assert not error.maybe_applied  # nothing was sent
    assert error.retry_after is None
    assert "supplier" in str(error)
    assert "reorder" in str(error)


def test_permanent_error_is_not_retryable_and_applies_nothing(target: Target) -> None:
    async def go() -> DeliveryError:
        async with opened(target.make()) as connector:
            error = await failure(connector, "reorder", order("A-1", -1), "run1:0:0")
            # The connector stays usable after a refused effect.
            await connector.deliver("reorder", order("B-2", 1), "run1:0:1")
            return error

    error = run(go())
    assert not error.retryable
    assert "supplier" in str(error)
    assert "reorder" in str(error)
    assert target.applied() == [("B-2", 1)]


def test_unknown_operation_is_not_retryable(target: Target) -> None:
    async def go() -> DeliveryError:
        async with opened(target.make()) as connector:
            return await failure(connector, "cancel", order(), "run1:0:0")

    error = run(go())
    assert isinstance(error, UnknownOperation)
    assert not error.retryable
    assert "'cancel'" in str(error)
    assert "reorder" in str(error)  # names what is known
    assert target.applied() == []


def test_close_is_safe_twice_and_before_use(target: Target) -> None:
    async def go() -> None:
        unused = target.make()
        await unused.close()
        connector = target.make()
        await connector.deliver("reorder", order(), "run1:0:0")
        await connector.close()
        await connector.close()

    run(go())
    assert target.applied() == [("A-1", 3)]


# -- HTTP -------------------------------------------------------------------------------
def http(receiver: Receiver, path: str, **kwargs: Any) -> HttpConnector:
    return HttpConnector(
        "supplier",
        base_url=kwargs.pop("base_url", receiver.url),
        operations={"op": parse_http_op(path, kwargs.pop("method", "POST"))},
        **kwargs,
    )


def parse_http_op(path: str, method: str) -> Any:
    config = parse_connectors(
        {"x": {"type": "http", "base_url": "http://h", "operations": {"op": {
            "method": method, "path": path}}}}, "test"
    )["x"]  # fmt: skip
    assert isinstance(config, HttpConnectorConfig)
    return config.operations["op"]


def test_http_sends_json_with_the_key_and_configured_headers(receiver: Receiver) -> None:
    async def go() -> dict[str, Any] | None:
        async with opened(http(receiver, "/orders", method="PUT", headers={"X-Store": "42"})) as c:
            return await c.deliver("op", {"sku": "A-1", "qty": 2, "tags": ["x"]}, "run9:1:0")

    result = run(go())
    assert result == {"status": 201, "body": {"order": 1}}
    (seen,) = receiver.seen("/orders")
    assert seen.method == "PUT"
    assert seen.headers["Idempotency-Key"] == "run9:1:0"
    assert seen.headers["X-Store"] == "42"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == {"sku": "A-1", "qty": 2, "tags": ["x"]}


def test_http_replayed_answers_are_marked_duplicate(receiver: Receiver) -> None:
    async def go() -> list[dict[str, Any] | None]:
        async with opened(http(receiver, "/orders")) as c:
            return [await c.deliver("op", order(), "run1:0:0") for _ in range(2)]

    first, second = run(go())
    assert first == {"status": 201, "body": {"order": 1}}
    assert second == {"status": 201, "body": {"order": 1}, "duplicate": True}


def test_http_base_url_path_is_kept(receiver: Receiver) -> None:
    async def go() -> None:
        async with opened(http(receiver, "/orders", base_url=f"{receiver.url}/api")) as c:
            await c.deliver("op", order(), "k")

    run(go())
    assert [r.path for r in receiver.requests] == ["/api/orders"]


def test_http_messages_never_show_credentials(receiver: Receiver) -> None:
    base_url = f"http://edge:s3cret@127.0.0.1:{closed_port()}"

    async def go() -> DeliveryError:
        async with opened(http(receiver, "/orders", base_url=base_url)) as c:
            return await failure(c, "op", order(), "k")

    error = run(go())
    assert error.retryable
    assert "s3cret" not in str(error)
    assert "http://127.0.0.1:" in str(error)


@pytest.mark.parametrize(
    ("path", "status", "maybe_applied"),
    # A gateway timeout may hide an upstream that acted; the others say nothing was done.
    [("/always503", 503, False), ("/timeout408", 408, False), ("/gateway504", 504, True)],
)
def test_http_server_errors_and_408_are_retryable(
    receiver: Receiver, path: str, status: int, maybe_applied: bool
) -> None:
    async def go() -> DeliveryError:
        async with opened(http(receiver, path)) as c:
            return await failure(c, "op", order(), "k")

    error = run(go())
    assert error.retryable
    assert error.retry_after is None
    assert f"answered {status}" in str(error)
    assert error.maybe_applied is maybe_applied


def test_http_429_is_retryable_with_its_retry_after(receiver: Receiver) -> None:
    async def go() -> DeliveryError:
        async with opened(http(receiver, "/ratelimit")) as c:
            return await failure(c, "op", order(), "k")

    error = run(go())
    assert error.retryable
    assert error.retry_after == 3.0


def test_http_retry_after_seconds_and_date_are_honoured(receiver: Receiver) -> None:
    now = 1_800_000_000.0
    in_90s = email.utils.formatdate(now + 90, usegmt=True)
    past = email.utils.formatdate(now - 90, usegmt=True)

    async def go() -> list[float | None]:
        async with opened(http(receiver, "/busy", clock=lambda: now)) as c:
            hints = []
            for value in ("7", in_90s, past, "soon", "1e12"):
                error = await failure(c, "op", {"retry_after": value}, "k")
                assert error.retryable
                hints.append(error.retry_after)
            return hints

    assert run(go()) == [7.0, 90.0, 0.0, None, MAX_RETRY_AFTER]


def test_http_4xx_is_not_retryable_and_names_the_answer(receiver: Receiver) -> None:
    async def go() -> DeliveryError:
        async with opened(http(receiver, "/bad")) as c:
            return await failure(c, "op", order(), "k")

    error = run(go())
    assert not error.retryable
    assert "answered 400 Bad Request" in str(error)
    assert "unknown sku" in str(error)
    assert "POST http://127.0.0.1" in str(error)


def test_http_409_key_already_used_counts_as_delivered(receiver: Receiver) -> None:
    async def go() -> list[dict[str, Any] | None]:
        async with opened(http(receiver, "/orders409")) as c:
            return [await c.deliver("op", order(), "run1:0:0") for _ in range(2)]

    first, second = run(go())
    assert first == {"status": 201, "body": {"order": 1}}
    assert second is not None
    assert second["status"] == 409
    assert second["duplicate"] is True
    assert len(receiver.applied) == 1


def test_http_409_in_progress_is_retryable(receiver: Receiver) -> None:
    async def go() -> DeliveryError:
        async with opened(http(receiver, "/inprogress")) as c:
            return await failure(c, "op", order(), "k")

    error = run(go())
    assert error.retryable
    assert error.retry_after == 2.0
    assert "still in progress" in str(error)


def test_http_other_409_is_a_permanent_conflict(receiver: Receiver) -> None:
    async def go() -> DeliveryError:
        async with opened(http(receiver, "/conflict")) as c:
            return await failure(c, "op", order(), "k")

    error = run(go())
    assert not error.retryable
    assert "discontinued" in str(error)


def test_http_redirects_are_not_followed(receiver: Receiver) -> None:
    async def go() -> DeliveryError:
        async with opened(http(receiver, "/redirect")) as c:
            return await failure(c, "op", order(), "k")

    error = run(go())
    assert not error.retryable
    assert "Location /orders" in str(error)
    assert receiver.seen("/orders") == []


def test_http_text_bodies_are_cut_and_empty_ones_are_none(receiver: Receiver) -> None:
    async def go() -> list[dict[str, Any] | None]:
        async with opened(http(receiver, "/text")) as text, opened(http(receiver, "/empty")) as e:
            return [await text.deliver("op", {}, "k1"), await e.deliver("op", {}, "k2")]

    text, empty = run(go())
    assert text == {"status": 200, "body": "x" * 1000}
    assert empty == {"status": 204, "body": None}


def test_http_timeout_is_retryable_and_the_retry_is_deduplicated(receiver: Receiver) -> None:
    async def go() -> DeliveryError:
        async with opened(http(receiver, "/hold", timeout_s=0.2)) as c:
            error = await failure(c, "op", order(), "run1:0:0")
            # The receiver got the first request and applies it later: the retry with the
            # same key must not apply it again.
            receiver.release.set()
            for _ in range(100):
                if receiver.applied:
                    break
                await asyncio.sleep(0.02)
            await c.deliver("op", order(), "run1:0:0")
            return error

    error = run(go())
    assert error.retryable
    assert error.maybe_applied  # sent, and no answer: it may have been applied
    assert "Timeout" in str(error)
    assert len(receiver.applied) == 1


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ('{"error": "idempotency key already used"}', "duplicate"),
        ('{"code": "idempotency_key_reused", "message": "duplicate request"}', "duplicate"),
        ("request run1:0:0 was already processed", "duplicate"),
        ('{"error": "idempotency_key_in_use"}', "in_progress"),
        ("Idempotency-Key: a request is being processed", "in_progress"),
        ('{"error": "already exists"}', "conflict"),  # says nothing about the key
        ('{"error": "idempotency key does not match the payload"}', "conflict"),
        ("", "conflict"),
    ],
)
def test_409_classification(body: str, kind: str) -> None:
    assert classify_conflict(body, "run1:0:0") == kind


def test_retry_after_parsing() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after(None, now=now) is None
    assert parse_retry_after("  ", now=now) is None
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after("1.5", now=now) == 1.5
    assert parse_retry_after("-5", now=now) == 0.0
    assert parse_retry_after("nan", now=now) is None
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after("Fri, 31 Dec 1999 23:59:59 GMT", now=now) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00", now=now) == 0.0  # no zone: GMT
    assert parse_retry_after("next tuesday", now=now) is None


# -- SQL --------------------------------------------------------------------------------
def test_sqlite_records_keys_in_edgeos_effects(tmp_path: Path) -> None:
    target = sqlite_target(tmp_path)

    async def go() -> list[dict[str, Any] | None]:
        async with opened(target.make()) as c:
            return [await c.deliver("reorder", order(), "run1:0:0") for _ in range(2)]

    first, second = run(go())
    assert first == {"duplicate": False, "rowcount": 1}
    assert second == {"duplicate": True}
    conn = sqlite3.connect(tmp_path / "store.db")
    try:
        rows = conn.execute("SELECT key, operation FROM edgeos_effects").fetchall()
    finally:
        conn.close()
    assert rows == [("run1:0:0", "reorder")]


def test_sqlite_missing_file_is_retryable_then_delivers_once_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "later" / "store.db"

    async def go() -> DeliveryError:
        async with opened(sql_make(f"sqlite:///{path}")) as c:
            error = await failure(c, "reorder", order(), "run1:0:0")
            path.parent.mkdir()
            conn = sqlite3.connect(path)
            conn.execute(ORDERS_SQLITE)
            conn.close()
            await c.deliver("reorder", order(), "run1:0:0")
            return error

    error = run(go())
    assert error.retryable
    assert "SQLITE_CANTOPEN" in str(error)
    assert str(path) in str(error)


def test_sqlite_busy_database_is_retryable(tmp_path: Path) -> None:
    target = sqlite_target(tmp_path)
    config = sql_config(f"sqlite:///{tmp_path / 'store.db'}") | {"timeout_s": 0.1}
    blocker = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:

        async def go() -> DeliveryError:
            connector = build(parse_connectors({"supplier": config}, "test")["supplier"])
            async with opened(connector) as c:
                return await failure(c, "reorder", order(), "run1:0:0")

        error = run(go())
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert error.retryable
    assert "SQLITE_BUSY" in str(error)
    assert target.applied() == []


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_sql_specifics(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """RETURNING rows, JSON for nested values, missing fields, broken statements."""
    if kind == "sqlite":
        target = sqlite_target(tmp_path)
    else:
        target = postgres_target(*request.getfixturevalue("pg_schema"))

    async def go() -> tuple[Any, DeliveryError, DeliveryError]:
        async with opened(target.make()) as c:
            returned = await c.deliver(
                "reorder_returning", {"sku": "A-1", "qty": 2, "meta": {"why": "low"}}, "k1"
            )
            missing = await failure(c, "reorder", {"sku": "A-1"}, "k2")
            broken = await failure(c, "broken", {"sku": "A-1"}, "k3")
            # The keys of failed deliveries were rolled back with them: fixed, they apply.
            await c.deliver("reorder", order("B-2", 1), "k2")
            return returned, missing, broken

    returned, missing, broken = run(go())
    assert returned == {"duplicate": False, "rowcount": 1, "rows": [{"id": 1, "sku": "A-1"}]}
    assert not missing.retryable
    assert "'qty'" in str(missing)
    assert not broken.retryable
    assert "nowhere" in str(broken)
    assert target.applied() == [("A-1", 2), ("B-2", 1)]


def test_postgres_reconnects_after_the_server_drops_the_connection(
    pg_schema: tuple[str, str],
) -> None:
    import psycopg

    schema, url = pg_schema
    target = postgres_target(schema, url)
    assert POSTGRES_URL

    async def go() -> DeliveryError | None:
        async with opened(target.make()) as c:
            await c.deliver("reorder", order("A-1", 1), "k1")
            # Kill the pooled session, as a server restart would.
            with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s",
                    (schema,),
                ).fetchall()
            assert killed == [(True,)]
            try:
                await c.deliver("reorder", order("B-2", 1), "k2")
                error = None
            except DeliveryError as exc:
                error = exc
                await c.deliver("reorder", order("B-2", 1), "k2")
            return error

    error = run(go())
    # The stale pooled session fails once (retryable); the retry connects afresh.
    assert error is not None
    assert error.retryable
    assert "57P01" in str(error)
    assert target.applied() == [("A-1", 1), ("B-2", 1)]


def test_postgres_statement_stuck_behind_a_lock_times_out_retryably(
    pg_schema: tuple[str, str],
) -> None:
    import psycopg

    schema, url = pg_schema
    target = postgres_target(schema, url)
    config = sql_config(url) | {"timeout_s": 0.3}
    assert POSTGRES_URL

    async def go() -> DeliveryError:
        connector = build(parse_connectors({"supplier": config}, "test")["supplier"])
        async with opened(connector) as c:
            with psycopg.connect(with_search_path(POSTGRES_URL, schema)) as locker:
                locker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
                error = await failure(c, "reorder", order(), "k1")
                locker.rollback()
            await c.deliver("reorder", order(), "k1")  # its key went back with it
            return error

    error = run(go())
    assert error.retryable
    assert "57014" in str(error)
    assert target.applied() == [("A-1", 3)]


def test_postgres_delivers_many_keys_concurrently(pg_schema: tuple[str, str]) -> None:
    target = postgres_target(*pg_schema)

    async def go() -> None:
        async with opened(target.make()) as c:
            await asyncio.gather(
                *(c.deliver("reorder", order(f"S-{i}", 1), f"k{i}") for i in range(12))
            )

    run(go())
    assert sorted(target.applied()) == sorted((f"S-{i}", 1) for i in range(12))
    keys = pg_rows(pg_schema[0], "SELECT count(*) FROM edgeos_effects")
    assert keys == [(12,)]


@pytest.mark.parametrize(
    ("statement", "names", "pyformat"),
    [
        ("INSERT INTO t VALUES (:a, :b)", ["a", "b"], "INSERT INTO t VALUES (%(a)s, %(b)s)"),
        ("SELECT ':no', \"x:y\" WHERE a = :a", ["a"], "SELECT ':no', \"x:y\" WHERE a = %(a)s"),
        ("SELECT :a::int, 'it''s :x'", ["a"], "SELECT %(a)s::int, 'it''s :x'"),
        ("SELECT 5 % 2, '100%' -- :c\n, :d", ["d"], "SELECT 5 %% 2, '100%%' -- :c\n, %(d)s"),
        ("SELECT /* :c */ $$ :e $$, $q$ :f $q$, :g", ["g"], "SELECT /* :c */ $$ :e $$, "
         "$q$ :f $q$, %(g)s"),
        ("UPDATE t SET a = :a WHERE b = :a", ["a"], "UPDATE t SET a = %(a)s WHERE b = %(a)s"),
    ],
)  # fmt: skip
def test_placeholders_skip_literals_comments_and_casts(
    statement: str, names: list[str], pyformat: str
) -> None:
    assert placeholders(statement) == names
    assert to_pyformat(statement) == pyformat


# -- connectors.yaml --------------------------------------------------------------------
GOOD = """\
supplier:
  type: http
  base_url: http://127.0.0.1:9000
  timeout_s: 5
  headers: {X-Store: "42"}
  operations:
    reorder: {method: POST, path: /orders}
store:
  type: sql
  url: sqlite:///store.db
  operations:
    record_order: {statement: "INSERT INTO orders (sku, qty) VALUES (:sku, :qty)"}
warehouse:
  type: sql
  url: postgresql://edge@db.local/warehouse
  operations:
    ship: {statement: "UPDATE stock SET qty = qty - :qty WHERE sku = :sku"}
"""


def test_a_good_file_loads_and_builds(tmp_path: Path) -> None:
    path = tmp_path / "connectors.yaml"
    path.write_text(GOOD)
    configs = load_connectors(path)
    assert list(configs) == ["supplier", "store", "warehouse"]
    supplier, store, warehouse = configs.values()
    assert isinstance(supplier, HttpConnectorConfig)
    assert supplier.name == "supplier"
    assert supplier.timeout_s == 5
    assert supplier.headers == {"X-Store": "42"}
    assert supplier.operations["reorder"].method == "POST"
    assert isinstance(store, SqlConnectorConfig)
    # Relative SQLite paths are relative to connectors.yaml, not to the working directory.
    assert store.sqlite_path == tmp_path / "store.db"
    assert isinstance(warehouse, SqlConnectorConfig)
    assert warehouse.sqlite_path is None

    async def go() -> None:
        connectors = [build(config) for config in configs.values()]
        assert [type(c) for c in connectors] == [HttpConnector, SqlConnector, SqlConnector]
        for connector in connectors:
            assert isinstance(connector, Connector)
            await connector.close()

    run(go())


def test_an_empty_file_binds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "connectors.yaml"
    path.write_text("# no connectors yet\n")
    assert load_connectors(path) == {}


HTTP_OK = "  type: http\n  base_url: http://127.0.0.1:9000\n"
OPS_OK = "  operations:\n    reorder: {path: /orders}\n"


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("supplier:\n  type: ftp\n" + OPS_OK, "supplier.type", "unknown connector type 'ftp'"),
        ("supplier:\n  base_url: http://x\n" + OPS_OK, "supplier.type", "required"),
        ("supplier:\n" + HTTP_OK + "  operations:\n    reorder: {method: POST}\n",
         "supplier.operations.reorder.path", "required"),
        ("supplier:\n" + HTTP_OK + "  operations:\n    reorder: {path: orders}\n",
         "supplier.operations.reorder.path", "must start with '/'"),
        ("supplier:\n" + HTTP_OK + "  operations:\n    reorder: {method: GET, path: /o}\n",
         "supplier.operations.reorder.method", "POST"),
        ("supplier:\n" + HTTP_OK + "  operations: {}\n", "supplier.operations", "at least 1"),
        ("supplier:\n" + HTTP_OK, "supplier.operations", "required"),
        ("supplier:\n" + HTTP_OK + "  retries: 3\n" + OPS_OK, "supplier.retries",
         "unknown field"),
        ("supplier:\n  type: http\n  base_url: ftp://x\n" + OPS_OK, "supplier.base_url",
         "not an http:// or https:// URL"),
        ("supplier:\n" + HTTP_OK + "  timeout_s: -1\n" + OPS_OK, "supplier.timeout_s",
         "greater than 0"),
        ("supplier:\n" + HTTP_OK + "  headers: {X-Store: 42}\n" + OPS_OK,
         "supplier.headers.X-Store", "valid string"),
        ("supplier:\n" + HTTP_OK + "  headers: {Idempotency-Key: x}\n" + OPS_OK,
         "supplier.headers", "set by the connector"),
        ("supplier:\n" + HTTP_OK + "  operations:\n    re.order: {path: /o}\n",
         "supplier.operations", "operation name 're.order'"),
        ("store:\n  type: sql\n  url: sqlite:///s.db\n  operations:\n    rec: {}\n",
         "store.operations.rec.statement", "required"),
        ("store:\n  type: sql\n  url: sqlite:///s.db\n  operations:\n    rec: {statement: ' '}\n",
         "store.operations.rec.statement", "blank"),
        ("store:\n  type: sql\n  url: mysql://h/db\n  operations:\n    rec: {statement: x}\n",
         "store.url", "sqlite:/// or postgresql://"),
        ("store:\n  type: sql\n  url: 'sqlite:///:memory:'\n  operations:\n    r: {statement: x}\n",
         "store.url", "in-memory"),
        ("sup.plier:\n" + HTTP_OK + OPS_OK, "sup.plier", "binding name"),
        ("supplier: http\n", "supplier", "must be a mapping"),
        ("supplier:\n  name: other\n" + HTTP_OK + OPS_OK, "supplier.name", "named by its key"),
    ],
)  # fmt: skip
def test_each_bad_field_is_refused_with_file_and_field(
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


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("supplier: [\n", "not valid YAML"),
        ("- supplier\n", "must be a mapping"),
    ],
)
def test_unreadable_files_are_refused(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "connectors.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError, match=reason) as info:
        load_connectors(path)
    assert str(path) in str(info.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read file") as info:
        load_connectors(tmp_path / "connectors.yaml")
    assert str(tmp_path / "connectors.yaml") in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "connectors.yaml"
    path.write_text("a:\n  type: ftp\nb:\n  type: http\n  base_url: nope\n" + OPS_OK)
    with pytest.raises(ManifestError) as info:
        load_connectors(path)
    assert len(info.value.problems) == 2
    assert "field 'a.type'" in str(info.value)
    assert "field 'b.base_url'" in str(info.value)
