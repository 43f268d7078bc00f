"""Every connector's deliveries are traced: the delivery worker opens a ``deliver`` span for
each attempt, a child of the effect's decision in its run's trace, whatever the connector
(HTTP, SQL, SMTP, MQTT when ``EDGEOS_TEST_MQTT_URL`` is set). Only HTTP passes the span on
to its receiver, as the W3C ``traceparent`` header.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from edgeos.connectors import DeliveryWorker, build_all, parse_connectors
from edgeos.state import Database, outbox
from edgeos.state.outbox import OutboxEntry
from edgeos.telemetry import tracing
from tests.test_connectors import Receiver, closed_port, run
from tests.test_connectors_smtp import MailStore

MQTT_URL = os.environ.get("EDGEOS_TEST_MQTT_URL")
RUN = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


@pytest.fixture
def traced(db: Database) -> Iterator[Database]:
    tracing.configure(tracing.TraceConfig(batch_delay_s=0.01), db.transaction)
    try:
        yield db
    finally:
        tracing.shutdown()


def deliver_all(db: Database, bindings: dict[str, Any], effects: list[OutboxEntry]) -> None:
    with db.transaction() as conn:
        for entry in effects:
            outbox.enqueue(conn, entry, at=0.0)
    connectors = build_all(parse_connectors(bindings, "connectors.yaml"))

    async def go() -> None:
        worker = DeliveryWorker(db, connectors, max_attempts=1)
        try:
            await worker.drain_once()
        finally:
            for connector in connectors.values():
                await connector.close()

    run(go())
    tracing.flush()


def delivery_spans(db: Database) -> dict[str, tracing.SpanRecord]:
    spans = tracing.spans_of_trace(db.reader(), tracing.trace_id(RUN))
    return {s.attributes["edgeos.effect.key"]: s for s in spans if s.name.startswith("deliver ")}


def test_each_connector_delivery_is_a_span_of_its_run(traced: Database, tmp_path: Path) -> None:
    receiver, mail = Receiver(), MailStore()
    smtp = Controller(mail, hostname="127.0.0.1", port=closed_port())
    smtp.start()
    store = tmp_path / "store.db"
    with sqlite3.connect(store) as conn:
        conn.execute("CREATE TABLE orders (sku TEXT NOT NULL, qty INTEGER NOT NULL)")
    conn.close()
    bindings: dict[str, Any] = {
        "supplier": {"type": "http", "base_url": receiver.url,
                     "operations": {"reorder": {"method": "POST", "path": "/orders"}}},
        "store": {"type": "sql", "url": f"sqlite:///{store}",
                  "operations": {"record": {"statement":
                      "INSERT INTO orders (sku, qty) VALUES (:sku, :qty)"}}},
        "mail": {"type": "smtp", "host": "127.0.0.1", "port": smtp.port,
                 "from": "edge-42@shop.example", "operations": {"send": {}}},
    }  # fmt: skip
    effects = [
        OutboxEntry(f"{RUN}:0:0", RUN, "supplier", "reorder", {"sku": "A-1", "qty": 3}),
        OutboxEntry(f"{RUN}:0:1", RUN, "store", "record", {"sku": "A-1", "qty": 3}),
        OutboxEntry(f"{RUN}:0:2", RUN, "mail", "send",
                    {"to": "buyer@supplier.example", "subject": "Reorder", "body": "3 of A-1"}),
        # Refused by the database (no such column): the attempt is a span with its error.
        OutboxEntry(f"{RUN}:0:3", RUN, "store", "record", {"sku": None, "qty": 3}),
    ]  # fmt: skip
    if MQTT_URL:
        topic = f"edgeos-test/{uuid.uuid4().hex[:12]}/alarm"
        bindings["plant"] = {"type": "mqtt", "url": MQTT_URL,
                             "operations": {"alarm": {"topic": topic}}}  # fmt: skip
        effects.append(OutboxEntry(f"{RUN}:0:4", RUN, "plant", "alarm", {"level": 3}))
    try:
        deliver_all(traced, bindings, effects)
    finally:
        receiver.stop()
        smtp.stop()
    spans = delivery_spans(traced)
    assert sorted(spans) == sorted(e.key for e in effects)
    for entry in effects:
        span = spans[entry.key]
        assert span.name == f"deliver {entry.connector}.{entry.operation}"
        # A child of the decision to make the effect, in the run's trace.
        assert span.parent_id == tracing.effect_span_id(entry.key)
        assert span.attributes["edgeos.connector"] == entry.connector
    assert spans[f"{RUN}:0:3"].status == "error"
    assert {spans[e.key].status for e in effects if e.key != f"{RUN}:0:3"} == {"unset"}
    assert spans[f"{RUN}:0:0"].attributes["http.response.status_code"] == 201
    # HTTP, and only HTTP, passes the span on: the receiver joins the run's trace.
    (request,) = receiver.requests
    trace = tracing.trace_id(RUN)
    assert request.headers["traceparent"] == f"00-{trace}-{spans[f'{RUN}:0:0'].span_id}-01"
    (message,) = mail.received
    assert "traceparent" not in {name.lower() for name in message}


def test_an_effect_of_no_run_is_delivered_without_a_span(traced: Database) -> None:
    receiver = Receiver()
    bindings = {
        "supplier": {
            "type": "http",
            "base_url": receiver.url,
            "operations": {"reorder": {"method": "POST", "path": "/orders"}},
        }
    }
    try:
        deliver_all(
            traced,
            bindings,
            [OutboxEntry("manual-1", "manual", "supplier", "reorder", {"sku": "A-1", "qty": 1})],
        )
    finally:
        receiver.stop()
    (request,) = receiver.requests
    assert "traceparent" not in {name.lower() for name in request.headers}
    assert traced.reader().execute("SELECT count(*) FROM spans").fetchone()[0] == 0
