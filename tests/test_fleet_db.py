"""The fleet's SQLite file: its WAL is copied into the file off the requests' path."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from edgeos.fleet import tables
from edgeos.fleet.db import FleetDatabase


def test_commits_leave_the_wal_to_the_checkpoint_loop(tmp_path: Path) -> None:
    db = FleetDatabase(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        db.migrate()
        db.checkpoint()
        before = (tmp_path / "fleet.db").stat().st_size
        # About 6 MB of events: past SQLite's default threshold of 1,000 pages (4 MB),
        # where a commit would otherwise copy the WAL into the file, holding the lock.
        events = [{"device_id": f"dev-{n % 50}", "kind": "log", "at": float(n),
                   "data": f'{{"message": "{"x" * 1200}"}}'} for n in range(5000)]  # fmt: skip
        for start in range(0, len(events), 500):
            with db.begin() as conn:
                conn.execute(sa.insert(tables.telemetry_events), events[start : start + 500])
        assert (tmp_path / "fleet.db").stat().st_size - before < 1_000_000
        assert (tmp_path / "fleet.db-wal").stat().st_size > 5_000_000
        db.checkpoint()
        assert (tmp_path / "fleet.db").stat().st_size - before > 5_000_000
        with db.read() as conn:
            count = conn.execute(sa.select(sa.func.count()).select_from(tables.telemetry_events))
            assert count.scalar_one() == 5000
    finally:
        db.close()
