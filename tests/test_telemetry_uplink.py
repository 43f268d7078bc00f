"""The node's side of telemetry: KPI records, the bounded buffer, redaction, the caps."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from edgeos.connectors.personal import pseudonym
from edgeos.connectors.vault import Vault, load_key
from edgeos.protocol.telemetry import decompressor
from edgeos.state import Database
from edgeos.sync.kpi_records import KpiCollector
from edgeos.sync.telemetry_uplink import (
    KPI_RESERVE,
    TelemetryUplink,
    UplinkConfig,
    sampled,
    vault_secrets,
)
from edgeos.telemetry.buffer import DROP_ORDER, TelemetryBuffer, enqueue
from edgeos.telemetry.metrics import MetricsRegistry
from edgeos.telemetry.sketch import DDSketch

T0 = 1_800_000_000.0  # a minute boundary (divisible by 60)


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database(tmp_path / "node.db") as database:
        yield database


def add_run(db: Database, agent: str, state: str, created: float, finished: float,
            cost: float = 0.0) -> str:  # fmt: skip
    run_id = str(uuid.uuid4())
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO runs (id, agent, agent_version, trigger, input, state, seed, created_at,"
            " updated_at, finished_at, cost) VALUES (?, ?, '1', 'manual', '{}', ?, 0, ?, ?, ?, ?)",
            (run_id, agent, state, created, finished, finished, cost),
        )
    return run_id


# -- the buffer ----------------------------------------------------------------------------


def test_drop_order_when_full(db: Database) -> None:
    assert DROP_ORDER == ("log", "trace", "kpi", "alert")
    pad = "x" * 80
    size = len(orjson.dumps({"i": 0, "pad": pad}))  # i < 10: every record the same size
    limit = 16 * size  # room for four records of each kind
    buffer = TelemetryBuffer(db, max_bytes=limit)
    for kind in ("alert", "kpi", "trace", "log"):
        for i in range(4):
            assert buffer.put(kind, {"i": i, "pad": pad})
    usage = buffer.usage()
    assert usage.records == {"alert": 4, "kpi": 4, "trace": 4, "log": 4}
    # Four more alerts: the oldest logs make room, nothing else.
    for i in range(4, 8):
        assert buffer.put("alert", {"i": i, "pad": pad})
    usage = buffer.usage()
    assert usage.bytes <= limit
    assert usage.records["alert"] == 8
    assert usage.records["kpi"] == 4
    assert usage.records["trace"] == 4
    assert usage.records.get("log", 0) == 0
    # Then traces, oldest first: the newest trace survives longest.
    for i in range(8, 10):
        assert buffer.put("alert", {"i": i, "pad": pad})
    kept = [orjson.loads(p)["i"] for (p,) in db.reader().execute(
        "SELECT payload FROM telemetry_buffer WHERE kind = 'trace' ORDER BY id")]  # fmt: skip
    assert kept == [2, 3]
    assert buffer.put("kpi", {"i": 4, "pad": pad})
    assert buffer.put("kpi", {"i": 5, "pad": pad})
    assert buffer.usage().records.get("trace", 0) == 0
    # A log never pushes out anything more important: it is dropped itself.
    assert not buffer.put("log", {"i": 0, "pad": pad})
    assert buffer.usage().dropped["log"] == 5
    assert buffer.usage().bytes <= limit


def test_batches_take_the_most_important_and_wait_for_acknowledgement(db: Database) -> None:
    buffer = TelemetryBuffer(db, max_bytes=1 << 20)
    buffer.put("log", {"n": 1})
    buffer.put("trace", {"n": 2})
    buffer.put("alert", {"n": 3})
    buffer.put("kpi", {"n": 4})
    seen: list[tuple[int, list[str], dict[str, int]]] = []

    def build(seq: int, records: Any, dropped: dict[str, int]) -> bytes:
        seen.append((seq, [r.kind for r in records], dropped))
        return b"body-%d" % seq

    batch = buffer.take_batch(build, max_payload_bytes=14)  # two records of 7 bytes
    assert batch is not None
    assert batch.seq == 1
    assert batch.records == 2
    assert seen[-1][1] == ["alert", "kpi"]
    # While it waits for its acknowledgement, no other batch; it survives a restart.
    assert buffer.take_batch(build, max_payload_bytes=1000) is None
    reopened = TelemetryBuffer(db, max_bytes=1 << 20)
    assert reopened.pending() == batch
    reopened.acknowledge(1)
    second = reopened.take_batch(build, max_payload_bytes=1000)
    assert second is not None
    assert second.seq == 2
    assert seen[-1][1] == ["trace", "log"]


def test_a_batch_too_large_for_the_allowance_is_halved(db: Database) -> None:
    buffer = TelemetryBuffer(db, max_bytes=1 << 20)
    for i in range(8):
        buffer.put("kpi", {"i": i})

    def build(seq: int, records: Any, dropped: dict[str, int]) -> bytes | None:
        return b"x" * len(records) if len(records) <= 3 else None

    batch = buffer.take_batch(build, max_payload_bytes=10_000)
    assert batch is not None
    assert batch.records == 2
    assert sum(buffer.usage().records.values()) == 6


# -- KPI records ---------------------------------------------------------------------------


def test_kpi_records_of_a_minute(db: Database) -> None:
    clock = Clock(T0 + 120)
    registry = MetricsRegistry()
    latency = registry.histogram("edgeos_inference_latency_seconds", "x", ("model", "version"))
    errors = registry.counter("edgeos_inference_errors_total", "x", ("model", "version"))
    collector = KpiCollector(db, registry, clock)
    add_run(db, "restock", "failed", T0 - 30, T0 - 20)  # before the minute: unrecovered
    decisions = [0.1 * (i + 1) for i in range(20)]
    for i, seconds in enumerate(decisions):
        add_run(db, "restock", "succeeded", T0 + 1 + i - seconds, T0 + 1 + i, cost=0.5)
    add_run(db, "restock", "failed", T0 + 30, T0 + 31)
    add_run(db, "restock", "succeeded", T0 + 40, T0 + 45)
    add_run(db, "other", "succeeded", T0 + 61, T0 + 62)  # the next minute
    for ms in range(1, 101):
        latency.observe(ms / 1000, "risk", "2")
    errors.inc("risk", "2", amount=3)
    records = {(r.agent, r.model): r for r in collector.minute(int(T0))}
    agent = records[("restock", "")]
    assert (agent.runs, agent.succeeded, agent.failed) == (22, 21, 1)
    assert agent.cost == pytest.approx(10.0)
    # Two recoveries: from the failure before the minute (T0-20 to T0+1), and 31 to 45.
    assert agent.recoveries == 2
    assert agent.recovery_s == pytest.approx(21.0 + 14.0)
    assert agent.decision is not None
    sketch = DDSketch.from_bytes(base64.b64decode(agent.decision))
    assert sketch.count == 21
    assert sketch.quantile(0.5) == pytest.approx(1.1, rel=0.02)
    model = records[("", "risk")]
    assert (model.version, model.errors) == ("2", 3)
    assert model.inference is not None
    inference = DDSketch.from_bytes(base64.b64decode(model.inference))
    assert inference.count == 100
    assert inference.quantile(0.99) == pytest.approx(0.099, rel=0.02)
    # The window started again: the next minute has no inference record of its own.
    nxt = collector.minute(int(T0) + 60)
    assert [r.agent for r in nxt] == ["other"]


def test_drift_is_sent_every_few_minutes(db: Database) -> None:
    clock = Clock(T0 + 60)
    collector = KpiCollector(db, None, clock)
    rng = np.random.default_rng(2)
    # What the model saw moved: 1000 observations around 0, then 200 around 3.
    rows = [(i, rng.normal(0 if i < 1000 else 3, 1, 4).astype("float32").tobytes(),
             float(rng.uniform(0.5, 1.0))) for i in range(1200)]  # fmt: skip
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO observations (agent, model, run_id, at, confidence, inputs) "
            "VALUES ('restock', 'risk', 'r', ?, ?, ?)",
            [(T0 - 1200 + i, conf, blob) for i, blob, conf in rows],
        )
    (record,) = collector.minute(int(T0))
    assert record.agent == "restock"
    assert record.drift is not None
    assert record.drift > 0.2
    clock.now += 60
    assert collector.minute(int(T0) + 60) == []  # computed again five minutes later
    clock.now += 300
    assert collector.minute(int(T0) + 360)[0].drift == pytest.approx(record.drift)


# -- the uplink ----------------------------------------------------------------------------


def test_personal_fields_and_secrets_never_leave(db: Database, tmp_path: Path) -> None:
    vault = Vault(db, load_key(tmp_path))
    secret = "sk-live-51HfQ2hJ9tQ"
    vault.set("supplier_api_key", secret, scopes=["http"])
    clock = Clock()
    uplink = TelemetryUplink(db, UplinkConfig(trace_percent=100), clock=clock,
                             secrets=vault_secrets(db, tmp_path))  # fmt: skip
    schema = {
        "type": "object",
        "properties": {"to": {"type": "string", "x-personal": True}, "text": {"type": "string"}},
    }
    email = "maria.lopez@example.org"
    uplink.install()
    try:
        kept = enqueue(
            "trace",
            {"name": "effect", "attributes": {"to": email, "text": f"key {secret} used"}},
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
            schema={"type": "object", "properties": {"attributes": schema}},
        )
        assert kept
        assert enqueue("log", {"message": f"calling with {secret}", "to": pseudonym(email)})
    finally:
        uplink.uninstall()
    assert not enqueue("log", {"message": "no sink, not kept"})
    batch = uplink.next_batch("device-1")
    assert batch is not None
    raw = decompressor().stream_reader(batch.body).read()
    assert email.encode() not in raw
    assert secret.encode() not in raw
    assert email.encode() not in batch.body
    assert secret.encode() not in batch.body
    doc = orjson.loads(raw)
    trace = doc["records"][0]["data"]
    assert trace["attributes"]["to"] == pseudonym(email)
    assert trace["attributes"]["text"] == "key *** used"
    # Nothing personal was stored on the way either.
    assert email not in str(db.reader().execute("SELECT * FROM telemetry_batch").fetchall())


def test_trace_sampling_keeps_whole_traces() -> None:
    ids = [uuid.uuid4().hex for _ in range(4000)]
    kept = [t for t in ids if sampled(t, 10)]
    assert 300 < len(kept) < 500
    assert all(sampled(t, 10) for t in kept)  # the same answer for every span of a trace
    assert not any(sampled(t, 0) for t in ids)
    assert all(sampled(t, 100) for t in ids)


def test_bandwidth_caps(db: Database) -> None:
    clock = Clock()
    config = UplinkConfig(interval_s=60, bytes_per_s=100, bytes_per_day=20_000)
    uplink = TelemetryUplink(db, config, clock=clock)
    assert config.batch_bytes == 6000  # 100 B/s over a 60 s interval
    sent = 0
    for i in range(300):  # random bytes: compression cannot make them fit anyway
        uplink.buffer.put("log", {"i": i, "blob": base64.b64encode(os.urandom(200)).decode()})
    batches = 0
    for _ in range(40):
        batch = uplink.next_batch("device-1")
        if batch is not None:
            assert len(batch.body) <= config.batch_bytes
            uplink._spent(len(batch.body))
            uplink.buffer.acknowledge(batch.seq)
            sent += len(batch.body)
            batches += 1
            # The rate: the next batch waits for the average to come back under it.
            assert uplink.next_batch("device-1") is None
        clock.now += 60
    assert batches >= 3
    assert sent <= config.bytes_per_day
    # The day's cap stopped the logs where the part kept for alerts and KPIs begins...
    assert 0 < uplink._left_today(clock.now) <= config.bytes_per_day * KPI_RESERVE
    left = sum(uplink.buffer.usage().records.values())
    assert left > 0  # kept, not lost
    # ... which a KPI still gets today, ahead of the waiting logs.
    uplink.buffer.put("kpi", {"agent": "inventory", "runs": 3}, at=clock.now)
    batch = uplink.next_batch("device-1")
    assert batch is not None
    kinds = {
        r["kind"] for r in orjson.loads(decompressor().stream_reader(batch.body).read())["records"]
    }
    assert kinds == {"kpi"}
    uplink._spent(len(batch.body))
    uplink.buffer.acknowledge(batch.seq)
    clock.now = (int(clock.now // 86_400) + 1) * 86_400.0  # a new UTC day
    assert uplink.next_batch("device-1") is not None


def test_a_clock_stepping_back_does_not_stall_the_uplink(db: Database) -> None:
    clock = Clock()
    uplink = TelemetryUplink(db, UplinkConfig(interval_s=60), clock=clock)
    uplink.buffer.put("alert", {"state": "firing"})
    batch = uplink.next_batch("device-1")
    assert batch is not None
    uplink._spent(len(batch.body))
    uplink.buffer.acknowledge(batch.seq)
    uplink.buffer.put("alert", {"state": "resolved"})
    assert uplink.next_batch("device-1") is None  # the interval
    clock.now -= 3600  # the time was synced an hour back
    assert uplink.next_batch("device-1") is not None  # not an hour and a minute later


def test_telemetry_bench_smoke() -> None:
    from tests.test_bench_smoke import run_bench

    out = run_bench("telemetry.py", "--hours", "0.5")
    assert "edgeos uplink" in out
    assert "OTLP/JSON, a request per metric per minute" in out
    assert "goal: at least 10x smaller" in out
    assert ": met" in out
