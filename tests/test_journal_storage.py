"""How journal payloads are kept: large ones compressed, the hash chain over the JSON."""

from __future__ import annotations

import sqlite3
import zlib
from typing import Any

import pytest

from edgeos.errors import StateError
from edgeos.state import Database, journal
from tests.stored import stored_bytes

# A step output like the demo agent's: a dozen lanes of model features.
LANES = {
    "lanes": [
        {"sku": f"sku-{i:03d}", "stock": i * 7, "features": [i / 7 + k / 3 for k in range(16)]}
        for i in range(12)
    ]
}


def append(db: Database, run_id: str, kind: str, payload: dict[str, Any], at: float) -> int:
    with db.transaction() as conn:
        return journal.append(conn, run_id, kind, payload, step="sense", at=at)


def stored_type(db: Database, seq: int) -> str:
    row = db.reader().execute("SELECT typeof(payload) FROM journal WHERE seq = ?", (seq,))
    return str(row.fetchone()[0])


def test_large_payloads_are_stored_compressed_and_read_back_unchanged(db: Database) -> None:
    big = append(db, "r1", "step_completed", LANES, 1.0)
    small = append(db, "r1", "run_finished", {"state": "succeeded"}, 2.0)

    assert stored_type(db, big) == "blob"
    assert stored_type(db, small) == "text"
    packed = db.reader().execute("SELECT length(payload) FROM journal WHERE seq = ?", (big,))
    assert packed.fetchone()[0] < len(journal.canonical(LANES)) / 2
    assert [r.payload for r in journal.for_run(db, "r1")] == [LANES, {"state": "succeeded"}]
    assert [r.payload for r in journal.records(db)] == [LANES, {"state": "succeeded"}]
    assert journal.verify(db).ok


def test_records_written_before_compression_still_read_and_verify(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A journal kept by an earlier release: every payload as text, however large.
    monkeypatch.setattr(journal, "COMPRESS_FROM", 10**9)
    old = append(db, "r1", "step_completed", LANES, 1.0)
    monkeypatch.undo()
    new = append(db, "r1", "step_completed", LANES, 2.0)

    assert (stored_type(db, old), stored_type(db, new)) == ("text", "blob")
    assert [r.payload for r in journal.for_run(db, "r1")] == [LANES, LANES]
    assert journal.verify(db) == journal.Verification(True, 2)


def test_a_changed_compressed_payload_is_found(db: Database) -> None:
    append(db, "r1", "step_completed", LANES, 1.0)
    target = append(db, "r1", "step_completed", LANES, 2.0)
    append(db, "r1", "run_finished", {"state": "succeeded"}, 3.0)
    forged = {**LANES, "lanes": LANES["lanes"][1:]}  # one lane dropped
    with sqlite3.connect(db.path) as raw:
        raw.execute(
            "UPDATE journal SET payload = ? WHERE seq = ?",
            (zlib.compress(journal.canonical(forged)), target),
        )

    result = journal.verify(db)
    assert (result.ok, result.first_bad_seq) == (False, target)
    assert "does not match its hash" in (result.reason or "")


def test_a_damaged_compressed_payload_is_reported_not_raised(db: Database) -> None:
    target = append(db, "r1", "step_completed", LANES, 1.0)
    with sqlite3.connect(db.path) as raw:
        raw.execute("UPDATE journal SET payload = substr(payload, 1, 40) WHERE seq = ?", (target,))

    result = journal.verify(db)
    assert (result.ok, result.first_bad_seq) == (False, target)
    assert "damaged" in (result.reason or "")
    with pytest.raises(StateError, match="journal payload is damaged"):
        journal.for_run(db, "r1")


def test_scans_for_leaks_see_inside_compressed_payloads(db: Database) -> None:
    # The secret-leak and personal-data tests read files through tests.stored: a raw
    # scan of the file would miss what a compressed payload holds.
    append(db, "r1", "step_completed", {**LANES, "note": "needle-7781"}, 1.0)
    db.checkpoint()

    assert b"needle-7781" not in db.path.read_bytes()
    assert b"needle-7781" in stored_bytes([db.path])
