"""The fleet's database: one engine, Alembic migrations, short transactions.

SQLite (the default, a file under the data directory) runs in WAL mode so readers never
wait for the writer, and every write transaction starts with ``BEGIN IMMEDIATE``: a
transaction that read first and wrote later could otherwise fail at once with
``database is locked`` when another connection committed in between (the busy timeout
does not cover that case). Within one process the write transactions also take a lock
first: SQLite's busy handler waits by sleeping (up to 100 ms a turn), so threads that
queue on a lock instead of on the file keep a busy fleet's sync latency low and steady.
For the same reason the WAL is copied into the file by a loop of the fleet every second
(:meth:`FleetDatabase.checkpoint`), not by the commit that happens to cross SQLite's
threshold while every other writer waits for it.
PostgreSQL gets a connection pool sized for a server that
does its database work on a thread pool.

SQLite connections run with ``secure_delete``: the bytes of a deleted or moved row are
overwritten with zeros, so a record erased from a device's memory backup leaves no copy
in the file's free space. (Earlier versions of a page can sit in the WAL until the next
checkpoint copies the newest one into the file.)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from edgeos.errors import ConfigError, UnavailableError
from edgeos.fleet import tables

#: Where the Alembic environment and revisions ship, inside the package.
MIGRATIONS = Path(__file__).with_name("migrations")

# How long a SQLite connection waits for the write lock before giving up.
_SQLITE_BUSY_TIMEOUT_MS = 15_000
# An option on a connection that only reads: SQLite then starts a deferred transaction.
_READ_ONLY = "edgeos_read_only"
# The WAL is copied into the file by a background loop (FleetDatabase.checkpoint), not by
# whichever commit crosses SQLite's threshold while it holds the write lock; this larger
# threshold only bounds the WAL should that loop stall. In pages (4 KB).
_SQLITE_AUTOCHECKPOINT_PAGES = 16_000


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL for ``url``: ``postgresql://`` means psycopg 3, paths mean SQLite.

    Raises ConfigError for a URL of a database the fleet does not support.
    """
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    scheme, _, rest = url.partition("://")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    if scheme in ("postgresql+psycopg", "sqlite", "sqlite+pysqlite"):
        return url
    raise ConfigError(
        f"database URL {scheme}://...: the fleet supports sqlite:///PATH and postgresql://..."
    )


class FleetDatabase:
    """The fleet database at ``url`` (``sqlite:///...`` or ``postgresql://...``)."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self._writer = threading.RLock() if self.is_sqlite else contextlib.nullcontext()
        self.engine: Engine = self._create_engine()

    def _create_engine(self) -> Engine:
        if self.is_sqlite:
            path = sa.engine.make_url(self.url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(
                self.url,
                connect_args={"check_same_thread": False, "timeout": _SQLITE_BUSY_TIMEOUT_MS / 1e3},
                pool_size=8,
                max_overflow=8,
            )
            event.listen(engine, "connect", _sqlite_connect)
            event.listen(engine, "begin", _sqlite_begin)
            return engine
        return sa.create_engine(
            self.url, pool_size=16, max_overflow=16, pool_pre_ping=True, pool_recycle=1800
        )

    def migrate(self) -> None:
        """Bring the schema to the newest revision (Alembic ``upgrade head``)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
        except sa.exc.OperationalError as exc:
            raise UnavailableError(f"cannot migrate the fleet database: {exc.orig}") from exc

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection in a transaction, committed on success and rolled back on error."""
        with self._writer, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection in a transaction that only reads (no write lock on SQLite)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(**{_READ_ONLY: True})
            with conn.begin():
                yield conn

    def checkpoint(self) -> None:
        """Copy SQLite's WAL into the database file without blocking anyone (PASSIVE);
        nothing on PostgreSQL."""
        if self.is_sqlite:
            with self.engine.connect() as conn:
                # On the driver's connection, outside any transaction (the checkpoint
                # cannot run inside one, and SQLAlchemy would begin one).
                driver = conn.connection.driver_connection
                assert driver is not None
                driver.execute("PRAGMA wal_checkpoint(PASSIVE)").close()

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _sqlite_connect(dbapi_conn: Any, record: Any) -> None:
    # Take transaction control from the driver: `_sqlite_begin` says how each one starts.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA wal_autocheckpoint={_SQLITE_AUTOCHECKPOINT_PAGES}")
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Erased means erased: deleted rows are zeroed on disk, not just unlinked.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    if conn.get_execution_options().get(_READ_ONLY):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def bump_revision(conn: Connection) -> int:
    """Count one more change to the desired state; returns the new revision."""
    state = tables.fleet_state
    conn.execute(sa.update(state).where(state.c.key == "revision").values(value=state.c.value + 1))
    return current_revision(conn)


# Built once: read on every sync and every long-poll tick.
_REVISION = sa.select(tables.fleet_state.c.value).where(tables.fleet_state.c.key == "revision")


def current_revision(conn: Connection) -> int:
    """The desired state's revision (0 before any change)."""
    return int(conn.execute(_REVISION).scalar() or 0)


_NUDGES = sa.select(tables.fleet_state.c.value).where(tables.fleet_state.c.key == "nudges")
_DEVICE_REVISION = sa.select(_REVISION.scalar_subquery() + tables.devices.c.nudges).where(
    tables.devices.c.id == sa.bindparam("device_id")
)


def nudge_device(conn: Connection, device_id: str) -> None:
    """Wake one device's long poll, not every device's: something waits for it alone (an
    operator's answer, a run handed to it). Its revision (:func:`device_revision`) moves;
    the fleet's nudge count marks it for the replicas' watchers."""
    nudge_devices(conn, tables.devices.c.id == device_id)


def nudge_group(conn: Connection, group: str) -> None:
    """Wake the long polls of one group's devices (a secret granted to the group)."""
    nudge_devices(conn, tables.devices.c.group_name == group)


def nudge_devices(conn: Connection, which: sa.ColumnElement[bool]) -> None:
    """:func:`nudge_device` for every device ``which`` selects."""
    state, devices = tables.fleet_state, tables.devices
    conn.execute(sa.update(state).where(state.c.key == "nudges").values(value=state.c.value + 1))
    seq = conn.execute(_NUDGES).scalar_one()
    conn.execute(
        sa.update(devices).where(which).values(nudges=devices.c.nudges + 1, nudged_seq=seq)
    )


def device_revision(conn: Connection, device_id: str) -> int:
    """The revision a device is told: the desired state's, plus the news for it alone."""
    return int(conn.execute(_DEVICE_REVISION, {"device_id": device_id}).scalar() or 0)


def nudge_count(conn: Connection) -> int:
    """How many times any device was nudged."""
    return int(conn.execute(_NUDGES).scalar() or 0)


def nudged_since(conn: Connection, seq: int) -> dict[str, int]:
    """Devices nudged after the fleet's nudge count was ``seq``, with their nudges."""
    devices = tables.devices
    rows = conn.execute(sa.select(devices.c.id, devices.c.nudges).where(devices.c.nudged_seq > seq))
    return {str(device_id): int(nudges) for device_id, nudges in rows}


def write_audit(
    conn: Connection,
    *,
    actor: str,
    action: str,
    target: str,
    outcome: str,
    detail: str | None = None,
) -> None:
    """Record who did (or was refused) what to which thing."""
    conn.execute(
        sa.insert(tables.audit).values(
            at=time.time(),
            actor=actor[:128],
            action=action[:64],
            target=target[:256],
            outcome=outcome,
            detail=detail,
        )
    )


def audit_refusal(db: FleetDatabase, *, actor: str, action: str, target: str, detail: str) -> None:
    """Record a refusal in a transaction of its own: the refused work was rolled back."""
    with db.begin() as conn:
        write_audit(
            conn, actor=actor, action=action, target=target, outcome="refused", detail=detail
        )
