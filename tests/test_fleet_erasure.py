"""Erasure on the fleet: a memory record deleted from a device's backup leaves no copy of
its text in the SQLite file (``secure_delete`` on every fleet connection).

Some SQLite builds turn ``secure_delete`` on by default and others do not; the tests start
every connection with it off, as the second kind would, so that they prove the fleet
turns it on itself.
"""

from __future__ import annotations

import base64
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from edgeos.fleet import memory_backups
from edgeos.fleet.db import FleetDatabase
from edgeos.protocol.fleet import MemoryChange, MemoryRecordBody

TEXT = "the customer c-7 said her new door code is 4711-SECRET-xq"


def checkpoint(path: Path) -> None:
    """Copy the WAL into the database file and empty it, as SQLite does in its own time."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        conn.close()


def on_disk(path: Path) -> bytes:
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def put(seq: int, record: str, text: str) -> MemoryChange:
    body = MemoryRecordBody(
        id=record, agent="notes", text=text, metadata={"customer": "c-7"}, importance=0.5,
        model="embed@1", created_at=1000.0,
        vector=base64.b64encode(struct.pack("<4f", 0.1, 0.2, 0.3, 0.4)).decode(),
    )  # fmt: skip
    return MemoryChange(seq=seq, op="put", agent="notes", record=record, body=body)


def default_off(dbapi_conn: Any, record: Any) -> None:
    dbapi_conn.execute("PRAGMA secure_delete=OFF")


def fleet_db(path: Path) -> FleetDatabase:
    """The fleet's database, on an SQLite whose connections start without secure_delete."""
    db = FleetDatabase(f"sqlite:///{path}")
    event.listen(db.engine, "connect", default_off, insert=True)  # before the fleet's own
    return db


@pytest.mark.parametrize("fleet_setting", [True, False], ids=["fleet", "without-it"])
def test_an_erased_record_leaves_no_trace_in_the_database_file(
    tmp_path: Path, fleet_setting: bool
) -> None:
    path = tmp_path / "fleet.db"
    db = fleet_db(path)
    if not fleet_setting:  # the control: the scan finds what a plain delete leaves behind
        event.listen(db.engine, "connect", lambda conn, record: default_off(conn, record))
    try:
        db.migrate()
        with db.begin() as conn:
            memory_backups.apply_changes(
                conn, "dev-1", [put(1, "r1", TEXT), put(2, "r2", "the shop opens at nine")]
            )
        checkpoint(path)  # the record's text is in the file's pages now
        assert TEXT.encode() in on_disk(path)
        with db.begin() as conn:
            after = memory_backups.apply_changes(
                conn, "dev-1", [MemoryChange(seq=3, op="delete", agent="notes", record="r1")]
            )
        assert (after.position, after.records) == (3, 1)
        checkpoint(path)
        data = on_disk(path)
        assert b"the shop opens at nine" in data  # the other record is still there
        # Not only unlinked: the freed bytes of the row were overwritten.
        assert (b"4711-SECRET-xq" in data) is not fleet_setting
    finally:
        db.close()
