"""``edgeos node status`` on the fleet's side of a node: the telemetry uplink's buffer
(records and bytes by kind, the batch in flight, drops, the last batch acknowledged) and
memory replication against the fleet's position, in the snapshot and the terminal view."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgeos.cli import status_view
from edgeos.node.status import NodeStatus, collect_status
from edgeos.settings import load_settings
from edgeos.state import Database
from edgeos.telemetry.buffer import TelemetryBuffer

LIVE = {"url": "https://fleet.example", "device_id": "dev-1", "group": "stores",
        "link_state": "online", "link_since": 1.0, "last_sync": 2.0}  # fmt: skip


def test_status_shows_the_telemetry_buffer_and_memory_replication(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load_settings({"data_dir": tmp_path / "node"}, environ={})
    with Database(settings.database_path) as db:
        empty = collect_status(db, settings, running=False, fleet_live=LIVE)
        assert empty.fleet_link is not None
        assert empty.fleet_link.telemetry is not None
        assert empty.fleet_link.telemetry.last_acknowledged_seq is None
        assert empty.fleet_link.telemetry.records == {}

        # Two batches go and are acknowledged; a third is in flight; more waits; a log
        # record does not fit a full buffer and is dropped.
        buffer = TelemetryBuffer(db, max_bytes=2048)
        for seq in (1, 2):
            buffer.put("kpi", {"minute": 60 * seq, "agent": "restock"})
            batch = buffer.take_batch(lambda s, r, d: b"x" * 40, max_payload_bytes=4096)
            assert batch is not None
            assert batch.seq == seq
            buffer.acknowledge(seq)
        buffer.put("alert", {"rule": "p99"})
        assert buffer.take_batch(lambda s, r, d: b"y" * 50, max_payload_bytes=4096) is not None
        buffer.put("kpi", {"minute": 240, "agent": "restock"})
        buffer.put("trace", {"span_id": "a" * 16, "name": "step decide"})
        buffer.put("trace", {"span_id": "b" * 16, "name": "step act"})
        assert not buffer.put("log", {"text": "z" * 3000})
        # Memory: 5 changes logged here, the fleet confirmed 3.
        with db.transaction() as conn:
            conn.execute(
                "INSERT INTO sqlite_sequence (name, seq) SELECT 'memory_changes', 5 "
                "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'memory_changes')"
            )
            conn.execute("UPDATE sqlite_sequence SET seq = 5 WHERE name = 'memory_changes'")
            conn.execute(
                "INSERT INTO memory_replicas (target, position, updated_at) VALUES (?, 3, ?)",
                ("fleet:dev-1", time.time()),
            )
        snapshot = collect_status(db, settings, running=False, fleet_live=LIVE)

    link = snapshot.fleet_link
    assert link is not None
    assert link.telemetry is not None
    assert link.memory is not None
    t = link.telemetry
    assert t.records == {"kpi": 1, "trace": 2}
    assert t.bytes["kpi"] == len('{"minute":240,"agent":"restock"}')
    assert t.dropped == {"log": 1}
    assert t.pending_batch is not None
    assert (t.pending_batch.seq, t.pending_batch.records, t.pending_batch.bytes) == (3, 1, 50)
    assert t.last_acknowledged_seq == 2
    m = link.memory
    assert (m.local_seq, m.fleet_position, m.behind) == (5, 3, 2)
    # The JSON form carries it all and reads back the same.
    doc = json.loads(snapshot.dumps())
    assert doc["fleet_link"]["telemetry"]["pending_batch"]["seq"] == 3
    assert doc["fleet_link"]["memory"]["behind"] == 2
    assert NodeStatus.from_json(doc) == snapshot

    status_view.show_fleet(link)
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "telemetry: buffer 1 kpi (32 B), 2 trace (" in out
    assert "batch 3 in flight (1 records, 50 B)" in out
    assert "dropped 1 log" in out
    assert "last acknowledged batch 2" in out
    assert "memory replication: fleet at 3 of 5, 2 change(s) behind" in out
