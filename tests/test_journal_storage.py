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


def agent_records(db: Database, runs: int, start: float = 0.0) -> None:
    """What an agent journals: a run's start, a step with varied figures, its finish."""
    for i in range(runs):
        run, at = f"run-{i:05d}", float(start + i)  # times are floats, as time.time() gives
        append(db, run, "run_started", {"agent": "restock", "input": {"store": i % 7}}, at)
        lanes = {"lanes": [{"sku": f"sku-{(i + k) % 40:03d}", "stock": (i * k) % 97,
                            "risk": round(((i + k) % 13) / 13, 3)} for k in range(6)]}  # fmt: skip
        append(db, run, "step_completed", lanes, at + 0.1)
        append(db, run, "run_finished", {"state": "succeeded", "outcome": {"orders": i % 3}},
               at + 0.2)  # fmt: skip


def stored_size(db: Database, after: int) -> int:
    row = db.reader().execute("SELECT sum(length(payload)) FROM journal WHERE seq > ?", (after,))
    return int(row.fetchone()[0])


def test_a_dictionary_trained_on_the_journal_shrinks_every_record_after_it(
    db: Database,
) -> None:
    agent_records(db, 60)  # 180 records: not enough to learn from yet
    assert journal.train_dictionary(db) is None
    agent_records(db, 40, start=100)
    first = db.reader().execute("SELECT max(seq) FROM journal").fetchone()[0]
    made = journal.train_dictionary(db)
    assert made is not None
    assert journal.train_dictionary(db) is None  # not due again until many more records

    # The same records again, without and then with the dictionary.
    plain = Database(db.path.with_name("plain.db")).open()
    try:
        agent_records(plain, 100, start=1000)
        agent_records(db, 100, start=1000)
        without, with_dictionary = stored_size(plain, 0), stored_size(db, first)
    finally:
        plain.close()
    assert with_dictionary < without / 2, (with_dictionary, without)
    # Records too small for zlib alone are compressed now.
    size, kind = (
        db.reader()
        .execute(
            "SELECT length(payload), typeof(payload) FROM journal "
            "WHERE seq > ? AND kind = 'step_completed' LIMIT 1",
            (first,),
        )
        .fetchone()
    )
    assert kind == "blob"
    assert size < journal.COMPRESS_FROM / 4
    # Read back unchanged, old and new, and the chain verifies.
    payloads = [r.payload for r in journal.records(db)]
    assert payloads[-1] == {"state": "succeeded", "outcome": {"orders": 99 % 3}}
    assert len(payloads) == 600
    assert journal.verify(db) == journal.Verification(True, 600)


def test_another_process_reads_records_of_a_dictionary_made_after_it_opened(
    db: Database,
) -> None:
    reader = Database(db.path).open()  # the CLI, opened while the node keeps writing
    try:
        assert journal.records(reader) is not None
        agent_records(db, 100)
        assert journal.train_dictionary(db) is not None
        agent_records(db, 5, start=500)
        journal._dictionaries.clear()  # as in a process that never saw the dictionary
        last = list(journal.records(reader))[-1]
        assert last.payload == {"state": "succeeded", "outcome": {"orders": 4 % 3}}
    finally:
        reader.close()


def test_a_missing_dictionary_or_a_damaged_frame_is_reported(db: Database) -> None:
    agent_records(db, 100)
    made = journal.train_dictionary(db)
    target = append(db, "r1", "step_completed", LANES, 500.0)
    with sqlite3.connect(db.path) as raw:
        (frame,) = raw.execute("SELECT payload FROM journal WHERE seq = ?", (target,)).fetchone()
        assert frame.startswith(journal.ZSTD_MAGIC)
        damaged = frame[:-3] + bytes(3)  # its last bytes, the content checksum, zeroed
        raw.execute("UPDATE journal SET payload = ? WHERE seq = ?", (damaged, target))
    result = journal.verify(db)
    assert (result.ok, result.first_bad_seq) == (False, target)
    assert "damaged" in (result.reason or "")

    later = append(db, "r2", "step_completed", LANES, 600.0)
    with sqlite3.connect(db.path) as raw:
        raw.execute("UPDATE journal SET payload = ? WHERE seq = ?", (b"", target))  # set aside
        raw.execute("DELETE FROM journal_dicts WHERE id = ?", (made,))
    journal._dictionaries.clear()
    with pytest.raises(StateError, match=f"needs dictionary {made}, which the database"):
        journal.for_run(db, "r2")
    result = journal.verify(db)
    assert result.ok is False
    assert result.first_bad_seq is not None
    assert result.first_bad_seq <= later


def test_records_from_before_the_dictionary_are_stored_again_with_it(db: Database) -> None:
    agent_records(db, 150)  # a journal kept with zlib alone (and small records as text)
    assert journal.recompress(db) == 0  # nothing to do without a dictionary
    before = stored_size(db, 0)
    old = [r.payload for r in journal.records(db)]
    assert journal.train_dictionary(db) is not None
    agent_records(db, 10, start=1000)  # written with the dictionary already

    first = journal.recompress(db, limit=200, batch=64)  # a pass does a bounded share
    rest = journal.recompress(db)
    assert first > 0
    assert rest > 0
    assert journal.recompress(db) == 0  # done: the next passes cost two queries
    assert stored_size(db, 0) < before * 0.6
    assert [r.payload for r in journal.records(db)][:450] == old
    assert journal.verify(db) == journal.Verification(True, 480)
    tiny = db.reader().execute(
        "SELECT count(*) FROM journal WHERE typeof(payload) = 'text' AND length(payload) >= ?",
        (journal.DICTIONARY_FROM,),
    )
    assert tiny.fetchone()[0] == 0
