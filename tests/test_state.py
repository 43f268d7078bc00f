"""The node database: identity, named migrations, refusals that change nothing, transactions.

Every check reads the file through a separate ``sqlite3`` connection where it can, so it
tests what is on disk rather than what the Database object believes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgeos.errors import SchemaVersionError, StateError
from edgeos.state import MIGRATIONS, Database, Migration, file_bytes

EDGEOS_APP_ID = int.from_bytes(b"edgo", "big")
ITEMS = Migration("9000_test_items", "CREATE TABLE items (v TEXT PRIMARY KEY);")


class Boom(Exception):
    """An application error raised inside a transaction."""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "node.db"


@pytest.fixture
def db(path: Path) -> Iterator[Database]:
    with Database(path, (*MIGRATIONS, ITEMS)) as database:
        yield database


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection to the file, outside the code under test."""
    return sqlite3.connect(path, isolation_level=None)


def items(path: Path) -> list[str]:
    conn = raw(path)
    try:
        return [v for (v,) in conn.execute("SELECT v FROM items ORDER BY v")]
    finally:
        conn.close()


def insert(db: Database, *values: str, then_raise: BaseException | None = None) -> None:
    """Insert values into items in one transaction (nested if one is open), then maybe fail."""
    with db.transaction() as conn:
        for value in values:
            conn.execute("INSERT INTO items VALUES (?)", (value,))
        if then_raise is not None:
            raise then_raise


def migrations_table(path: Path) -> list[tuple[str, float]]:
    conn = raw(path)
    try:
        return list(conn.execute("SELECT name, applied_at FROM edgeos_migrations ORDER BY rowid"))
    finally:
        conn.close()


# -- a new file, reopening, upgrading --------------------------------------------------
def test_new_file_is_wal_marked_and_fully_migrated(path: Path) -> None:
    with Database(path) as db:
        assert db.applied_migrations() == [m.name for m in MIGRATIONS]
    conn = raw(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA application_id").fetchone()[0] == EDGEOS_APP_ID
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    assert {"edgeos_migrations", "model_versions", "model_profiles"} <= tables
    assert [name for name, _ in migrations_table(path)] == [m.name for m in MIGRATIONS]


def test_migration_names_are_unique() -> None:
    names = [m.name for m in MIGRATIONS]
    assert len(names) == len(set(names))


def test_reopening_applies_nothing_twice(path: Path) -> None:
    with Database(path):
        pass
    before = migrations_table(path)
    with Database(path) as db:
        db.open()  # open() on an open database is a no-op
        assert db.applied_migrations() == [m.name for m in MIGRATIONS]
    assert migrations_table(path) == before


def test_upgrade_applies_only_the_new_migration(path: Path) -> None:
    with Database(path):
        pass
    before = migrations_table(path)
    with Database(path, (*MIGRATIONS, ITEMS)) as db:
        assert db.applied_migrations() == [*(m.name for m in MIGRATIONS), ITEMS.name]
        with db.transaction() as conn:
            conn.execute("INSERT INTO items VALUES ('new table works')")
    after = migrations_table(path)
    assert after[: len(before)] == before
    assert [name for name, _ in after[len(before) :]] == [ITEMS.name]


def test_failing_migration_applies_nothing_and_can_be_retried(path: Path) -> None:
    broken = Migration("0002_broken", "CREATE TABLE later (a INTEGER);\nSELECT * FROM nowhere;")
    with pytest.raises((sqlite3.Error, StateError), match="nowhere"):
        Database(path, (*MIGRATIONS, broken)).open()
    conn = raw(path)
    try:
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    assert tables == set()  # the whole first open rolled back, 0001 included
    with Database(path, (*MIGRATIONS, ITEMS)) as db:
        assert db.applied_migrations()[-1] == ITEMS.name


def test_migration_scripts_may_hold_triggers_and_comments(path: Path) -> None:
    script = """
        -- a comment line before the first statement
        CREATE TABLE t (a INTEGER, b INTEGER);
        CREATE TRIGGER t_b AFTER INSERT ON t BEGIN
            UPDATE t SET b = NEW.a * 2 WHERE rowid = NEW.rowid;
        END;
    """
    with Database(path, [Migration("m", script)]) as db:
        with db.transaction() as conn:
            conn.execute("INSERT INTO t (a) VALUES (21)")
        assert db.reader().execute("SELECT b FROM t").fetchone() == (42,)


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(
            "CREATE TABLE a (x); CREATE TABLE b (y);",
            id="two-statements-one-line",
        ),
        pytest.param(
            "CREATE TABLE a (x);\nCREATE TABLE b (y);\n-- the end\n",
            id="trailing-comment",
        ),
        pytest.param(
            "CREATE TABLE a (x);\nCREATE TABLE b (y); -- note\n", id="end-of-line-comment"
        ),
    ],
)
def test_migration_scripts_are_split_into_statements(path: Path, script: str) -> None:
    with Database(path, [Migration("m", script)]) as db:
        tables = {n for (n,) in db.reader().execute("SELECT name FROM sqlite_master")}
    assert {"a", "b"} <= tables


# -- refusing files that are not ours --------------------------------------------------
def test_file_from_a_newer_edgeos_is_refused_unchanged(path: Path) -> None:
    with Database(path):
        pass
    conn = raw(path)
    conn.execute("INSERT INTO edgeos_migrations VALUES ('0999_from_the_future', 0)")
    conn.close()
    before_rows = migrations_table(path)
    before_bytes = path.read_bytes()

    db = Database(path)
    with pytest.raises(SchemaVersionError, match="0999_from_the_future"):
        db.open()
    assert path.read_bytes() == before_bytes
    assert migrations_table(path) == before_rows
    with pytest.raises(StateError, match="not open"):
        db.data_version()


def test_sqlite_file_of_another_app_is_refused_unchanged(path: Path) -> None:
    path.parent.mkdir(parents=True)
    conn = raw(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute("INSERT INTO notes VALUES ('mine')")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StateError, match="not an edgeos node database") as info:
        Database(path).open()
    assert not isinstance(info.value, SchemaVersionError)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before


def test_empty_sqlite_file_with_a_foreign_application_id_is_refused(path: Path) -> None:
    path.parent.mkdir(parents=True)
    conn = raw(path)
    conn.execute("PRAGMA application_id = 1234")
    conn.close()
    with pytest.raises(StateError, match="not an edgeos node database"):
        Database(path).open()


def test_zero_byte_file_is_treated_as_new(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.touch()
    with Database(path) as db:
        assert db.applied_migrations() == [m.name for m in MIGRATIONS]


def test_non_sqlite_file_is_refused_with_state_error(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"model weights, not a database\n" * 64)
    before = path.read_bytes()
    try:
        with pytest.raises(StateError, match="not an SQLite database"):
            Database(path).open()
    finally:
        assert path.read_bytes() == before


def test_unopened_database_refuses_use(path: Path) -> None:
    db = Database(path)
    with pytest.raises(StateError, match="not open"):
        db.data_version()
    with pytest.raises(StateError, match="not open"):
        db.reader()
    assert not path.exists()


# -- transactions ----------------------------------------------------------------------
def test_transaction_commits(db: Database, path: Path) -> None:
    insert(db, "a", "b")
    assert items(path) == ["a", "b"]


def test_exception_rolls_back_everything_and_propagates(db: Database, path: Path) -> None:
    with pytest.raises(Boom):
        insert(db, "a", then_raise=Boom())
    assert items(path) == []
    insert(db, "b")  # the database is usable afterwards
    assert items(path) == ["b"]


def test_sql_error_rolls_back_earlier_statements(db: Database, path: Path) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        insert(db, "a", "a")
    assert items(path) == []


def test_failed_nested_transaction_rolls_back_only_itself(db: Database, path: Path) -> None:
    error = Boom("inner")
    with db.transaction():
        insert(db, "outer-before")
        with pytest.raises(Boom) as info:
            insert(db, "inner", then_raise=error)
        assert info.value is error
        insert(db, "inner-ok")  # a second savepoint after the failed one
        insert(db, "outer-after")
    assert items(path) == ["inner-ok", "outer-after", "outer-before"]


def test_uncaught_nested_failure_rolls_back_the_outer_transaction(db: Database, path: Path) -> None:
    def outer() -> None:
        with db.transaction():
            insert(db, "outer")
            insert(db, "inner", then_raise=Boom())

    with pytest.raises(Boom):
        outer()
    assert items(path) == []


def test_nested_success_commits_with_the_outer(db: Database, path: Path) -> None:
    with db.transaction() as conn:
        with db.transaction():
            insert(db, "two")
            insert(db, "three")
        assert items(path) == []  # not visible to others before the outer commit
        conn.execute("INSERT INTO items VALUES ('one')")
    assert items(path) == ["one", "three", "two"]


def test_data_version_changes_when_another_connection_commits(db: Database, path: Path) -> None:
    version = db.data_version()
    assert db.data_version() == version  # stable while nobody writes
    other = raw(path)
    other.execute("INSERT INTO items VALUES ('from the CLI')")
    other.close()
    assert db.data_version() != version


def test_commits_counts_this_objects_committed_transactions(db: Database, path: Path) -> None:
    """Caches use ``commits`` for this process's writes and data_version for the others'."""
    before = db.commits
    insert(db, "a")
    assert db.commits == before + 1
    with pytest.raises(Boom):
        insert(db, "b", then_raise=Boom())
    assert db.commits == before + 1
    with db.transaction():
        insert(db, "c")
        insert(db, "d")
    assert db.commits == before + 2
    other = raw(path)
    other.execute("INSERT INTO items VALUES ('elsewhere')")
    other.close()
    assert db.commits == before + 2


def test_concurrent_writers_serialise_and_all_land(db: Database, path: Path) -> None:
    """Read-modify-write in each transaction: a lost update would show in the total."""
    insert(db, "0")
    threads, rounds = 4, 20
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(rounds):
            with db.transaction() as conn:
                (n,) = conn.execute("SELECT v FROM items").fetchone()
                conn.execute("UPDATE items SET v = ?", (str(int(n) + 1),))

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(work) for _ in range(threads)]:
            future.result()
    assert items(path) == [str(threads * rounds)]


def test_reader_sees_commits_but_not_open_transactions(db: Database) -> None:
    def count() -> int:  # runs on another thread, with that thread's reader
        return int(db.reader().execute("SELECT count(*) FROM items").fetchone()[0])

    with ThreadPoolExecutor(1) as pool:
        with db.transaction() as conn:
            conn.execute("INSERT INTO items VALUES ('a')")
            assert pool.submit(count).result() == 0
        assert pool.submit(count).result() == 1
        assert db.reader().execute("SELECT v FROM items").fetchall() == [("a",)]


def test_each_thread_gets_its_own_reader(db: Database) -> None:
    mine = db.reader()
    assert db.reader() is mine
    with ThreadPoolExecutor(1) as pool:
        theirs = pool.submit(db.reader).result()
    assert theirs is not mine


def test_close_twice_is_safe_and_reopen_works(path: Path) -> None:
    db = Database(path, (*MIGRATIONS, ITEMS)).open()
    reader = db.reader()
    db.close()
    db.close()
    with pytest.raises(sqlite3.ProgrammingError):
        reader.execute("SELECT 1")  # readers are closed too
    with pytest.raises(StateError, match="not open"), db.transaction():
        pass
    db.open()
    try:
        with db.transaction() as conn:
            conn.execute("INSERT INTO items VALUES ('again')")
        assert db.reader().execute("SELECT v FROM items").fetchall() == [("again",)]
    finally:
        db.close()
    assert items(path) == ["again"]


# -- compaction -------------------------------------------------------------------------
def fill_and_thin(db: Database, rows: int = 2000) -> None:
    """Rows of 2 KB, then every other one deleted: half the pages free, spread through."""
    insert(db, *(f"{i:05d}" + "x" * 2048 for i in range(rows)))
    with db.transaction() as conn:
        conn.execute("DELETE FROM items WHERE CAST(substr(v, 1, 5) AS INTEGER) % 2 = 1")
    db.checkpoint()


def test_compaction_hands_free_pages_back_and_keeps_every_row(db: Database, path: Path) -> None:
    fill_and_thin(db)
    kept = items(path)
    before = file_bytes(path)
    done = db.compact()
    assert not done.rebuilt
    assert not done.skipped
    assert done.bytes_before == before
    assert done.bytes_after == file_bytes(path)
    assert done.freed > 0.4 * before  # half the rows went; their pages leave the file
    assert items(path) == kept
    conn = raw(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    finally:
        conn.close()
    assert db.compact().freed == 0  # nothing left to hand back


def test_a_file_from_an_older_edgeos_is_rebuilt_once_when_there_is_room(path: Path) -> None:
    # Older versions marked the file before asking for a page map, so it has none.
    path.parent.mkdir(parents=True)
    conn = raw(path)
    conn.execute(f"PRAGMA application_id={EDGEOS_APP_ID}")
    conn.close()
    with Database(path, (*MIGRATIONS, ITEMS)) as db:
        fill_and_thin(db)
        kept = items(path)
        before = file_bytes(path)
        # Not enough room for the rebuild's copies: nothing changes, and it says what is needed.
        skipped = db.compact(free_disk=before // 4)
        assert skipped.freed == 0
        assert not skipped.rebuilt
        assert "needs" in skipped.skipped
        assert "free on its filesystem" in skipped.skipped
        assert file_bytes(path) == before
        done = db.compact(free_disk=10 * before)
        assert done.rebuilt
        assert done.freed > 0.4 * before
        assert items(path) == kept
        # From now on it shrinks in place.
        with db.transaction() as conn:
            conn.execute("DELETE FROM items WHERE v < '00500'")
        db.checkpoint()
        again = db.compact(free_disk=0)
        assert not again.rebuilt
        assert again.freed > 0
    conn = raw(path)
    try:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_compaction_refuses_to_run_inside_a_transaction(db: Database) -> None:
    fill_and_thin(db, rows=50)
    with pytest.raises(StateError, match="inside a transaction"), db.transaction():
        db.compact()


def test_node_compact_command_rebuilds_an_older_file_once_then_shrinks_it_in_place(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from edgeos.cli.main import app

    data = tmp_path / "data"
    path = data / "node.db"
    data.mkdir()
    conn = raw(path)
    conn.execute(f"PRAGMA application_id={EDGEOS_APP_ID}")  # as older versions made it
    conn.close()
    with Database(path) as db, db.transaction() as tx:  # a node's own table, half emptied
        tx.executemany(
            "INSERT INTO observations (agent, model, run_id, at, confidence, inputs) "
            "VALUES ('a', 'm', 'r', ?, 0.5, ?)",
            [(i, bytes(2048)) for i in range(2000)],
        )
        tx.execute("DELETE FROM observations WHERE at % 2 = 1")

    def kept() -> list[tuple[int, bytes]]:
        conn = raw(path)
        try:
            return list(conn.execute("SELECT at, inputs FROM observations ORDER BY at"))
        finally:
            conn.close()

    rows = kept()
    assert len(rows) == 1000
    before = file_bytes(path)
    first = CliRunner().invoke(app, ["node", "compact", "--data-dir", str(data)])
    assert first.exit_code == 0, first.output
    assert "rebuilt once" in first.output
    assert file_bytes(path) < 0.6 * before
    assert kept() == rows
    second = CliRunner().invoke(app, ["node", "compact", "--data-dir", str(data)])
    assert second.exit_code == 0, second.output
    assert "rebuilt" not in second.output
    missing = CliRunner().invoke(app, ["node", "compact", "--data-dir", str(tmp_path / "none")])
    assert missing.exit_code != 0
    assert "no node database at" in str(missing.exception)
    assert not (tmp_path / "none").exists()


def open_handles(path: Path) -> int:
    """This process's open file descriptors on ``path`` (each connection holds one)."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc to count open files")
    count = 0
    for fd in fds.iterdir():
        try:
            count += fd.readlink() == path.resolve()
        except OSError:
            continue  # closed while we looked
    return count


def test_a_reading_threads_connection_closes_after_the_thread_ends(
    db: Database, path: Path
) -> None:
    def read() -> None:
        assert db.reader().execute("SELECT count(*) FROM edgeos_migrations").fetchone()[0] > 0

    def threads(n: int) -> int:
        """Run ``n`` threads one after another, each gone after its read (as pooled
        threads end when idle); the files open on the database afterwards."""
        for _ in range(n):
            thread = threading.Thread(target=read)
            thread.start()
            thread.join()
        return open_handles(path)

    # SQLite keeps a closed connection's file open for the next one (POSIX locks are per
    # process and file), so the count settles a little above one per live connection;
    # what matters is that it does not grow with every thread that ever read.
    settled = threads(3)
    assert threads(40) == settled
    read()  # a thread still alive keeps its connection and reads on
    assert db.reader().execute("SELECT 2").fetchone() == (2,)
