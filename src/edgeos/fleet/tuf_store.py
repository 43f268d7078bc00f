"""Where the fleet's TUF repository lives: every signed version of every role, and the
bytes of every target.

:class:`TufStore` is the interface the repository (:mod:`edgeos.fleet.tuf_repo`) writes
through; :class:`SqlTufStore` keeps it in the fleet database (tables ``tuf_metadata`` and
``blobs``), so replicas sharing the database serve one repository and publish without
overwriting each other; :class:`MemoryTufStore` is the in-memory reference.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import sqlalchemy as sa

from edgeos.errors import ConflictError
from edgeos.fleet.tables import blobs, fleet_state, tuf_metadata


class TufStore(Protocol):
    """Where the repository keeps metadata versions and target bytes.

    Writers call the other methods inside :meth:`transaction`, which serializes them
    across threads and, for a shared database, across replicas.
    """

    def transaction(self) -> AbstractContextManager[None]:
        """Hold the writer lock; everything done inside is committed together."""
        ...

    def latest(self, role: str) -> tuple[int, bytes] | None:
        """The highest version of ``role`` and its bytes, or None when there is none."""
        ...

    def get(self, role: str, version: int) -> bytes | None:
        """One version of ``role``, or None."""
        ...

    def put_metadata(self, role: str, version: int, data: bytes, expires_at: float) -> None:
        """Store a new version; an existing (role, version) is a ConflictError."""
        ...

    def put_blob(self, sha256: str, data: bytes) -> None:
        """Store target bytes under their SHA-256 (kept as they are if present)."""
        ...

    def get_blob(self, sha256: str) -> bytes | None:
        """Target bytes by SHA-256, or None."""
        ...


class MemoryTufStore:
    """A :class:`TufStore` in memory: for tests, and the reference for the others."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.metadata: dict[tuple[str, int], bytes] = {}
        self.blobs: dict[str, bytes] = {}

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the store's lock (reentrant, like nesting in one database transaction).

        Not atomic: a failure halfway leaves what was put. The repository puts the
        timestamp last, so readers never follow a timestamp to missing files.
        """
        with self._lock:
            yield

    def latest(self, role: str) -> tuple[int, bytes] | None:
        """The highest version of ``role`` and its bytes, or None."""
        with self._lock:
            versions = [v for (r, v) in self.metadata if r == role]
            if not versions:
                return None
            top = max(versions)
            return top, self.metadata[(role, top)]

    def get(self, role: str, version: int) -> bytes | None:
        """One version of ``role``, or None."""
        with self._lock:
            return self.metadata.get((role, version))

    def put_metadata(self, role: str, version: int, data: bytes, expires_at: float) -> None:
        """Store a new version of ``role``; never replaces one."""
        with self._lock:
            if (role, version) in self.metadata:
                raise ConflictError(f"TUF {role} version {version} exists already")
            self.metadata[(role, version)] = data

    def put_blob(self, sha256: str, data: bytes) -> None:
        """Store target bytes under their hash."""
        with self._lock:
            self.blobs.setdefault(sha256, data)

    def get_blob(self, sha256: str) -> bytes | None:
        """Target bytes by hash, or None."""
        with self._lock:
            return self.blobs.get(sha256)


# Key of the PostgreSQL advisory lock that serializes TUF writers ("edgeTUF\x01").
_PG_LOCK_KEY = 0x6564_6765_5455_4601
_SQL_LOCK_ROW = "tuf_lock"


class SqlTufStore:
    """A :class:`TufStore` over the fleet database (tables ``tuf_metadata`` and ``blobs``).

    :meth:`transaction` takes a database-wide writer lock: ``pg_advisory_xact_lock`` on
    PostgreSQL, elsewhere a write to the ``fleet_state`` row ``tuf_lock`` (on SQLite the
    first write of a transaction takes the database's write lock). Calls made inside the
    transaction, on the same thread, run on its connection (see :meth:`connection`).
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        read: Callable[[], AbstractContextManager[sa.Connection]] | None = None,
    ) -> None:
        """``read``, if given, opens a connection for reads outside a transaction (one
        that takes no write lock, say); by default ``engine.connect()``."""
        self._engine = engine
        self._read = engine.connect if read is None else read
        self._local = threading.local()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One database transaction holding the TUF writer lock; reentrant per thread."""
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        with self._engine.begin() as conn:
            self._lock(conn)
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    @staticmethod
    def _lock(conn: sa.Connection) -> None:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
            return
        # The first statement is a write, so the transaction holds the write lock before
        # it reads anything and sees every version committed before it.
        bumped = conn.execute(
            sa.update(fleet_state)
            .where(fleet_state.c.key == _SQL_LOCK_ROW)
            .values(value=fleet_state.c.value + 1)
        )
        if bumped.rowcount == 0:
            conn.execute(sa.insert(fleet_state).values(key=_SQL_LOCK_ROW, value=1))

    @contextmanager
    def connection(self) -> Iterator[sa.Connection]:
        """The connection of this thread's :meth:`transaction`, else a new transaction.

        Lets a caller write its own rows (the ``artifacts`` row of a publish, say) in
        the same transaction as the TUF metadata they go with.
        """
        conn: sa.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self._engine.begin() as fresh:
            yield fresh

    @contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        conn: sa.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self._read() as fresh:
            yield fresh

    def latest(self, role: str) -> tuple[int, bytes] | None:
        """The highest version of ``role`` and its bytes, or None."""
        query = (
            sa.select(tuf_metadata.c.version, tuf_metadata.c.data)
            .where(tuf_metadata.c.role == role)
            .order_by(tuf_metadata.c.version.desc())
            .limit(1)
        )
        with self._reading() as conn:
            row = conn.execute(query).first()
        return None if row is None else (int(row.version), bytes(row.data))

    def get(self, role: str, version: int) -> bytes | None:
        """One version of ``role``, or None."""
        query = sa.select(tuf_metadata.c.data).where(
            tuf_metadata.c.role == role, tuf_metadata.c.version == version
        )
        with self._reading() as conn:
            data = conn.execute(query).scalar_one_or_none()
        return None if data is None else bytes(data)

    def put_metadata(self, role: str, version: int, data: bytes, expires_at: float) -> None:
        """Insert a new version of ``role``; never replaces one."""
        row = {"role": role, "version": version, "data": data, "expires_at": expires_at}
        try:
            with self.connection() as conn:
                conn.execute(sa.insert(tuf_metadata).values(**row))
        except sa.exc.IntegrityError as exc:
            raise ConflictError(f"TUF {role} version {version} exists already") from exc

    def put_blob(self, sha256: str, data: bytes) -> None:
        """Insert target bytes under their hash, unless present."""
        with self.connection() as conn:
            present = conn.execute(
                sa.select(blobs.c.sha256).where(blobs.c.sha256 == sha256)
            ).first()
            if present is None:
                conn.execute(sa.insert(blobs).values(sha256=sha256, data=data))

    def get_blob(self, sha256: str) -> bytes | None:
        """Target bytes by hash, or None."""
        with self._reading() as conn:
            data = conn.execute(
                sa.select(blobs.c.data).where(blobs.c.sha256 == sha256)
            ).scalar_one_or_none()
        return None if data is None else bytes(data)
