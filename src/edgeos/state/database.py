"""The node database: WAL mode, named migrations, one writer, many readers.

All writes go through :meth:`Database.transaction`, which serialises writers inside the
process with a lock and across processes with ``BEGIN IMMEDIATE`` (the CLI and a running
node may share one file). Nested transactions become SAVEPOINTs, so a helper can be
atomic on its own and still join its caller's transaction.

A write the disk cannot take (full, over a quota or a file size limit, or failing) raises
:class:`DiskFullError`: the transaction is rolled back whole, the file stays consistent,
and the same write succeeds once there is room again.

Rows deleted (by retention, pruning) leave free pages that SQLite reuses but keeps in the
file. :meth:`Database.compact` hands them back to the filesystem: a file made by this
version keeps a map of its pages (``auto_vacuum=INCREMENTAL``) and shrinks in place; an
older one is rebuilt once to get that map.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgeos.errors import SchemaVersionError, StateError, UnavailableError
from edgeos.state.migrations import MIGRATIONS, Migration

# 'edgo' in ASCII: marks the file as an edgeos node database.
APPLICATION_ID = 0x6564676F
BUSY_TIMEOUT_MS = 10_000
# Page cache of each reader connection, in KiB (SQLite's default is 2000).
READER_CACHE_KIB = 256

# SQLite's primary result codes for a write the disk refused: SQLITE_FULL (ENOSPC) and
# SQLITE_IOERR (EFBIG past a file size limit, EDQUOT, EIO). Either way nothing of the
# transaction is in the file.
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
# PRAGMA auto_vacuum: 0 (none, SQLite's default) or 2 (incremental).
_AUTO_VACUUM_INCREMENTAL = 2


class DiskFullError(UnavailableError, StateError):
    """The disk cannot take a write (full, or failing); retryable once there is room.

    An UnavailableError (HTTP 503, ``retryable``) first, so that callers wait and try
    again; a StateError too, because it is about the node database.
    """


def is_storage_error(exc: BaseException) -> bool:
    """Whether an exception is SQLite saying the disk refused a write."""
    if isinstance(exc, DiskFullError):
        return True
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    return code is not None and code & 0xFF in (_SQLITE_FULL, _SQLITE_IOERR)


def file_bytes(path: Path) -> int:
    """An SQLite file plus its WAL, in bytes (0 for a file that does not exist)."""
    wal = path.with_name(path.name + "-wal")
    return sum(p.stat().st_size for p in (path, wal) if p.exists())


@dataclass(frozen=True)
class Compaction:
    """What :meth:`Database.compact` did."""

    #: The file and its WAL before and after, in bytes.
    bytes_before: int
    bytes_after: int
    #: The file was rebuilt (``VACUUM``) to get its page map: once in its life.
    rebuilt: bool = False
    #: Why free pages were left in the file, when they were.
    skipped: str = ""

    @property
    def freed(self) -> int:
        """Bytes handed back to the filesystem."""
        return max(0, self.bytes_before - self.bytes_after)


class Database:
    """The node's SQLite file. Thread-safe; safe to share with other processes."""

    def __init__(self, path: Path, migrations: Sequence[Migration] = MIGRATIONS) -> None:
        self.path = path
        self._migrations = tuple(migrations)
        self._write_lock = threading.RLock()
        self._writer: sqlite3.Connection | None = None
        self._depth = 0
        #: Transactions this object committed; lets caches notice this process's writes.
        self.commits = 0
        self._local = threading.local()
        # Each reading thread's connection, with the thread: closed once the thread ends.
        self._readers: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._readers_lock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------
    def open(self) -> Database:
        """Create or open the file and apply pending migrations. Idempotent."""
        with self._write_lock:
            if self._writer is not None:
                return self
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            try:
                self._check_identity(conn)
                conn.execute("PRAGMA journal_mode=WAL")
                self._writer = conn
                self._migrate()
            except BaseException:
                self._writer = None
                conn.close()
                raise
        return self

    def close(self) -> None:
        """Close every connection. Safe to call twice."""
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        with self._readers_lock:
            for _, conn in self._readers:
                conn.close()
            self._readers.clear()
        self._local = threading.local()

    def __enter__(self) -> Database:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- access -----------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; commits on success, rolls back on any exception.

        Nested use opens a SAVEPOINT that rolls back alone and re-raises.
        """
        with self._write_lock:
            conn = self._require_writer()
            if self._depth == 0:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    self._depth = 1
                    yield conn
                    conn.execute("COMMIT")
                except BaseException as exc:
                    # A full disk can make SQLite roll the whole transaction back by itself
                    # (in_transaction is then False); a ROLLBACK would fail and hide why.
                    # A COMMIT that failed leaves nothing to keep either.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if is_storage_error(exc) and not isinstance(exc, DiskFullError):
                        raise DiskFullError(self._refused(exc)) from exc
                    raise
                else:
                    self.commits += 1
                finally:
                    self._depth = 0
            else:
                name = f"sp{self._depth}"
                conn.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield conn
                except BaseException:
                    # Gone with the whole transaction if SQLite rolled it back (a full disk):
                    # the outer level handles that, with the original error.
                    if conn.in_transaction:
                        conn.execute(f"ROLLBACK TO {name}")
                        conn.execute(f"RELEASE {name}")
                    raise
                else:
                    conn.execute(f"RELEASE {name}")
                finally:
                    self._depth -= 1

    def reader(self) -> sqlite3.Connection:
        """A read connection owned by the calling thread (WAL readers never block)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self._require_writer()
            conn = self._connect()
            # Every thread that reads gets its own connection, and each would keep up to
            # SQLite's default 2 MB of pages: a dozen threads grow the node by 20+ MB as the
            # file grows. The OS caches the file anyway; a small cache per reader is enough.
            conn.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB}")
            self._local.conn = conn
            with self._readers_lock:
                # Threads come and go (pools end idle ones): the connections of those gone
                # are closed here, or they would pile up with their caches and files.
                kept = []
                for thread, old in self._readers:
                    if thread.is_alive():
                        kept.append((thread, old))
                    else:
                        old.close()
                kept.append((threading.current_thread(), conn))
                self._readers = kept
        return conn

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to the file.

        Lets caches notice writes by other processes (the CLI) without re-reading tables.
        """
        with self._write_lock:
            row = self._require_writer().execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def checkpoint(self) -> None:
        """Fold the WAL back into the database and truncate the WAL file (frees disk).

        DiskFullError when the file cannot grow to take the WAL's pages: the WAL keeps them.
        """
        with self._write_lock, self._refusals():
            self._require_writer().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def has_page_map(self) -> bool:
        """Whether the file can shrink in place (made by this version, or rebuilt once)."""
        with self._write_lock:
            mode = self._require_writer().execute("PRAGMA auto_vacuum").fetchone()[0]
        return bool(mode == _AUTO_VACUUM_INCREMENTAL)

    def compact(self, free_disk: int | None = None, *, rebuild: bool = False) -> Compaction:
        """Hand the file's free pages back to the filesystem, so that the file shrinks.

        Writes wait while it runs: about as long as writing the freed pages. A file without
        a page map (made by an older edgeos) is rebuilt once instead, which writes a copy of
        its used pages twice (a temporary file, then the WAL): when ``free_disk`` (bytes free
        on its filesystem) is less than that, nothing is done and ``skipped`` says so.
        With ``rebuild``, such a file is rebuilt even when it has no free pages, to get the
        map for later. DiskFullError when the disk cannot take even the moved pages.
        """
        with self._write_lock:
            conn = self._require_writer()
            if self._depth:
                raise StateError("the database cannot be compacted inside a transaction")
            before = file_bytes(self.path)
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
            mapped = conn.execute("PRAGMA auto_vacuum").fetchone()[0] == _AUTO_VACUUM_INCREMENTAL
            if free_pages == 0 and (mapped or not rebuild):
                return Compaction(before, before)  # nothing to hand back
            rebuilding = not mapped
            needed = 2 * (before - free_pages * page)
            if rebuilding and free_disk is not None and free_disk < needed:
                return Compaction(
                    before, before,
                    skipped=f"a file from an older edgeos is rebuilt once to shrink, which "
                    f"needs {_mb(needed)} free on its filesystem; {_mb(free_disk)} is",
                )  # fmt: skip
            with self._refusals():
                if rebuilding:
                    conn.execute(f"PRAGMA auto_vacuum={_AUTO_VACUUM_INCREMENTAL}")
                    conn.execute("VACUUM")
                else:
                    # executescript steps the pragma to its end; execute() would free one page.
                    conn.executescript("PRAGMA incremental_vacuum;")
                self.checkpoint()
            return Compaction(before, file_bytes(self.path), rebuilt=rebuilding)

    def applied_migrations(self) -> list[str]:
        """Names of the migrations recorded in the file, in the order applied."""
        rows = self.reader().execute("SELECT name FROM edgeos_migrations ORDER BY rowid")
        return [name for (name,) in rows]

    # -- internals --------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys=ON")
            # FULL: a commit the node acknowledged survives a power cut, not only a crash.
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            if "not a database" in str(exc):
                raise StateError(f"{self.path} is not an SQLite database ({exc})") from exc
            raise StateError(f"cannot open node database {self.path}: {exc}") from exc
        return conn

    def _check_identity(self, conn: sqlite3.Connection) -> None:
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path} is not an SQLite database: {exc}") from exc
        if app_id == 0 and tables == 0:
            # A new file: its page map must come before anything is written to it.
            conn.execute(f"PRAGMA auto_vacuum={_AUTO_VACUUM_INCREMENTAL}")
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        elif app_id != APPLICATION_ID:
            raise StateError(f"{self.path} is an SQLite database, but not an edgeos node database")

    def _migrate(self) -> None:
        known = [m.name for m in self._migrations]
        with self.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS edgeos_migrations "
                "(name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            applied = [r[0] for r in conn.execute("SELECT name FROM edgeos_migrations")]
            unknown = sorted(set(applied) - set(known))
            if unknown:
                raise SchemaVersionError(
                    f"{self.path} was written by a newer edgeos (migrations {', '.join(unknown)} "
                    "are unknown to this version); upgrade edgeos to open it"
                )
            for migration in self._migrations:
                if migration.name in applied:
                    continue
                # executescript would COMMIT our transaction; run statements one by one.
                for statement in _statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO edgeos_migrations (name, applied_at) VALUES (?, ?)",
                    (migration.name, time.time()),
                )

    @contextmanager
    def _refusals(self) -> Iterator[None]:
        """SQLite's refusals of a write the disk cannot take, as DiskFullError."""
        try:
            yield
        except sqlite3.Error as exc:
            if is_storage_error(exc):
                raise DiskFullError(self._refused(exc)) from exc
            raise

    def _refused(self, exc: BaseException) -> str:
        what = "the disk is full" if "full" in str(exc) else f"the disk refused the write ({exc})"
        return (
            f"cannot write the node database {self.path}: {what}; nothing of this write was "
            "kept, and writes succeed again once space is freed"
        )

    def _require_writer(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StateError(f"node database {self.path} is not open")
        return self._writer


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into complete SQL statements.

    Semicolons inside literals or trigger bodies do not end a statement:
    ``sqlite3.complete_statement`` decides.
    """
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                yield pending.strip()
            pending = ""
    rest = pending[:-1]  # the split added a ';' after the last piece
    if any(line.strip() and not line.strip().startswith("--") for line in rest.splitlines()):
        raise StateError(f"incomplete SQL statement in migration: {rest.strip()[:60]}")
