"""A full disk: writes fail cleanly, nothing acknowledged is lost, and the node resumes.

The node's data directory lives on a small tmpfs the test mounts (``size=``), so the
disk really fills: SQLite gets ENOSPC from the kernel and reports SQLITE_FULL. Mounting
needs root (CAP_SYS_ADMIN); without it these tests skip and say why.

The node is a real ``edgeos node run`` child process with an agent whose runs send an
order to the loopback supplier. The test acknowledges runs (HTTP 201), fills the disk
with a filler file, keeps submitting until the node refuses with 503, checks the
database while the disk is full, then deletes the filler and waits for the node to
finish every acknowledged run and deliver every effect on its own, without a restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from edgeos.agents import store
from edgeos.demo.soak import install_restock
from edgeos.demo.supplier import SupplierService
from edgeos.errors import UnavailableError
from edgeos.node.guard import MB, Budgets, ResourceGuard
from edgeos.node.process import ServerProcess, node_process
from edgeos.state import Database, journal, outbox
from edgeos.state.writer import GroupWriter

pytestmark = pytest.mark.slow

# Big enough for the node's files and a few hundred runs, small enough to fill in a blink.
DISK_SIZE = "8m"

AGENT = """
import time

def decide(ctx, data):
    time.sleep(data["pause"])  # long enough for some runs to be under way at the fill
    return {"sku": data["sku"], "qty": 1 + ctx.random().randint(0, 8)}

def act(ctx, data):
    ctx.effect("supplier.reorder", {"store": "store-07", "sku": data["sku"], "qty": data["qty"]})
    # A note the size of a real step output, so that runs take room in the journal.
    return {**data, "note": "x" * 1024}

def report(ctx, data):
    return {"sku": data["sku"], "ordered": data["qty"]}
"""
STEPS = ["decide", "act", "report"]


# -- the small disk -----------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_SIZE mounted for this test only; skips where mounting is refused."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root; run the suite as root to test it")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0755", "edgeos-test", mount_point],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        reason = mounted.stderr.strip().splitlines()[0] if mounted.stderr.strip() else "refused"
        pytest.skip(f"cannot mount a size-limited tmpfs here ({reason})")
    try:
        yield mount_point
    finally:
        # Lazy: a process that still holds a file there (a failed test's node) cannot keep
        # the mount alive after the test.
        subprocess.run(["umount", "-l", mount_point], check=False)


def fill(disk: Path) -> Path:
    """Write a filler file until the kernel says ENOSPC; returns it (delete it to free)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = b"\0" * (64 * 1024)
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]  # the last few blocks, down to the byte
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


# -- the node -----------------------------------------------------------------------------
def install(root: Path, data_dir: Path, supplier_url: str) -> None:
    """The agent and its connector, installed as the CLI would before the node starts."""
    install_restock(root, data_dir, supplier_url, code=AGENT, steps=tuple(STEPS))


def submit(client: httpx.Client, sku: str, pause: float = 0.0) -> httpx.Response:
    """Start a run over the node's API; 201 acknowledges it."""
    return client.post("/api/agents/restock/runs", json={"input": {"sku": sku, "pause": pause}})


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(what: str, check: Callable[[], bool], timeout: float, node: ServerProcess) -> None:
    """Poll ``check()`` until true; fail with ``what`` and the node's log after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert node.returncode == -1, f"the node died ({node.returncode}):\n{node.log()[-4000:]}"
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached in {timeout:.0f} s; node log:\n{node.log()[-4000:]}")
        time.sleep(0.1)


# -- what must hold at any moment -----------------------------------------------------------
def check_consistent(db: Database) -> None:
    """The database is whole and every run's rows agree with its journal.

    A transaction cut in half by a full disk would show here: a step counted without its
    journal record, an effect journaled without its outbox row, or the reverse.
    """
    conn = db.reader()
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    verified = journal.verify(db)
    assert verified.ok, verified
    records: dict[str, Counter[tuple[str, object]]] = {}
    for record in journal.records(db):
        marker = record.payload.get("index", record.payload.get("key"))
        records.setdefault(record.run_id, Counter())[(record.kind, marker)] += 1
    effects: dict[str, list[outbox.OutboxEntry]] = {}
    for (key,) in conn.execute("SELECT key FROM outbox"):
        entry = outbox.get(db, key)
        assert entry is not None
        effects.setdefault(entry.run_id, []).append(entry)
    for run in store.runs(db, limit=100_000):
        seen = records.get(run.id, Counter())
        assert seen[("run_started", None)] == 1, (run.id, seen)
        for index in range(run.step_count):
            assert seen[("step_completed", index)] == 1, (run.id, index, seen)
        assert seen[("step_completed", run.step_count)] == 0, (run.id, seen)
        finished = seen[("run_finished", None)]
        assert finished == (1 if run.state in store.FINAL_STATES else 0), (run.id, seen)
        for entry in effects.get(run.id, []):
            assert seen[("effect_enqueued", entry.key)] == 1, (run.id, entry.key, seen)
            delivered = seen[("effect_delivered", entry.key)]
            assert delivered == (1 if entry.state == outbox.DELIVERED else 0), (entry, seen)
        enqueued = sum(n for (kind, _), n in seen.items() if kind == "effect_enqueued")
        assert enqueued == len(effects.get(run.id, [])), (run.id, seen)


# -- the tests ------------------------------------------------------------------------------
def test_full_disk_fails_writes_cleanly_and_the_node_resumes_when_space_returns(
    small_disk: Path, tmp_path: Path
) -> None:
    data_dir = small_disk / "node"
    with SupplierService() as supplier:
        install(tmp_path, data_dir, supplier.url)
        node = node_process(data_dir).start()
        db = Database(data_dir / "node.db").open()
        acknowledged: list[str] = []  # every run the node answered 201 for: a promise
        try:
            with node.client(timeout=10.0) as client:

                def start_runs(count: int, pause: float = 0.0) -> None:
                    for _ in range(count):
                        answer = submit(client, f"SKU-{len(acknowledged):04d}", pause)
                        assert answer.status_code == 201, answer.text
                        acknowledged.append(answer.json()["run_id"])

                # 1. Runs finished and delivered while there is room.
                start_runs(20)
                wait_until(
                    "the first runs finished and delivered",
                    lambda: outbox.counts(db)["delivered"] == 20,
                    30,
                    node,
                )
                finished_before = list(acknowledged)

                # 2. More runs, and the disk fills while they are under way: quick ones whose
                # orders are with the supplier (stalled by holding its lock, so they are in
                # flight), and slow ones still deciding.
                with supplier._lock:
                    start_runs(8)
                    start_runs(8, pause=0.5)
                    wait_until(
                        "the quick runs handed their orders over",
                        lambda: sum(outbox.counts(db).values()) == 28,
                        30,
                        node,
                    )
                    filler = fill(small_disk)
                    # SQLite may still reuse room it holds (WAL frames, free pages): runs are
                    # acknowledged until it cannot, then refused with 503, and nothing crashes.
                    refusals: list[httpx.Response] = []
                    deadline = time.monotonic() + 20
                    while len(refusals) < 5:  # in a row: the disk really is full
                        assert time.monotonic() < deadline, "the node never refused a run"
                        answer = submit(client, f"SKU-{len(acknowledged):04d}")
                        if answer.status_code == 201:
                            acknowledged.append(answer.json()["run_id"])
                            refusals.clear()
                        else:
                            refusals.append(answer)
                for refused in refusals:
                    assert refused.status_code == 503, refused.text
                    assert "disk is full" in refused.json()["error"], refused.text

                # While full: the node lives, answers, does not spin, and holds together.
                time.sleep(0.5)
                assert client.get("/v2/health/live").status_code == 200
                assert node.process is not None
                cpu_before, wall_before = cpu_seconds(node.process.pid), time.monotonic()
                time.sleep(2.0)
                busy = (cpu_seconds(node.process.pid) - cpu_before) / (
                    time.monotonic() - wall_before
                )
                assert busy < 0.5, f"the node burns {busy:.0%} of a core on a full disk"
                check_consistent(db)
                for run_id in finished_before:
                    assert store.run(db, run_id).state == "succeeded"
                    assert {e.state for e in outbox.for_run(db, run_id)} == {outbox.DELIVERED}
                counts = store.state_counts(db)
                assert "failed" not in counts, counts  # waiting, not failing
                waiting = counts.get("running", 0) + counts.get("pending", 0)
                assert waiting > 0, f"no run was under way when the disk filled: {counts}"
                assert "waits for the disk" in node.log()

                # 3. Space returns: the node goes on by itself, without a restart.
                filler.unlink()
                wait_until(
                    "every acknowledged run finished and every effect was delivered",
                    lambda: store.state_counts(db) == {"succeeded": len(acknowledged)}
                    and outbox.counts(db) == {"pending": 0, "delivered": len(acknowledged),
                                              "dead": 0},
                    30,
                    node,
                )  # fmt: skip
                start_runs(1)
                wait_until(
                    "a run started after the disk was freed finished",
                    lambda: outbox.counts(db)["delivered"] == len(acknowledged),
                    30,
                    node,
                )
        finally:
            db.close()
            code = node.stop()
        # uvicorn re-raises SIGTERM after its graceful shutdown.
        assert code in (0, -signal.SIGTERM), node.log()[-4000:]
        with Database(data_dir / "node.db") as db:
            check_consistent(db)
            assert store.state_counts(db) == {"succeeded": len(acknowledged)}
        # Each acknowledged run's order reached the supplier, exactly once in effect.
        applied = supplier.keys("order")
        assert {key.split(":")[0] for key in applied} == set(acknowledged)
        assert len(applied) == len(acknowledged)
        # Orders applied while the node could not record it: sent again, deduplicated.
        repeated = sum(applied.values()) - len(applied)
        assert repeated > 0
    print(
        f"{len(acknowledged)} runs acknowledged ({len(acknowledged) - 37} while filling), "
        f"{waiting} waited for the disk, {repeated} deliveries "
        "repeated and deduplicated"
    )


def test_group_writer_fails_the_whole_group_on_a_full_disk_and_recovers(small_disk: Path) -> None:
    """In-process: a group the disk refuses fails for every caller in it, with a
    retryable error, and leaves nothing behind; the writer goes on with the next group.

    The refusal comes mid-group: a big row spills the page cache and SQLite rolls the
    whole transaction back at once. The jobs after it must not then run outside any
    transaction: small rows still fit in the room the WAL holds, and would be committed
    one by one while their callers are told they failed.
    """

    def insert(value: bytes) -> Callable[[sqlite3.Connection], int]:
        def write(conn: sqlite3.Connection) -> int:
            cursor = conn.execute("INSERT INTO blobs (data) VALUES (?)", (value,))
            return int(cursor.lastrowid or 0)

        return write

    async def one_group(writer: GroupWriter, sizes: list[int]) -> list[object]:
        """Writes of these sizes, committed as one group: the writer is held by a job of
        its own until all of them are queued."""
        gate = threading.Event()
        held = asyncio.ensure_future(writer.write(lambda conn: gate.wait(10)))
        await asyncio.sleep(0.05)  # the writer thread is inside the holding job now
        jobs = [asyncio.ensure_future(writer.write(insert(os.urandom(n)))) for n in sizes]
        await asyncio.sleep(0)  # each job is queued
        gate.set()
        assert await held
        return list(await asyncio.gather(*jobs, return_exceptions=True))

    def rows(db: Database) -> int:
        return int(db.reader().execute("SELECT count(*) FROM blobs").fetchone()[0])

    async def scenario(db: Database, writer: GroupWriter) -> None:
        for _ in range(8):  # the WAL grows to ~600 KB ...
            await writer.write(insert(os.urandom(64 * 1024)))
        # ... and is checkpointed: the next writes reuse that room from its start.
        db.reader().execute("PRAGMA wal_checkpoint(RESTART)")
        filler = fill(small_disk)
        groups = writer.groups
        outcomes = await one_group(writer, [100, 3_000_000, 100, 100])
        assert writer.groups == groups + 2  # the holding job's group, then these four
        for outcome in outcomes:
            assert isinstance(outcome, UnavailableError), outcomes
            assert outcome.retryable
            assert "disk is full" in str(outcome)
        assert rows(db) == 8  # nothing of the refused group is in the file
        # Small writes fit in the room SQLite holds: the writer is not stuck.
        assert all(isinstance(n, int) for n in await one_group(writer, [100, 100]))
        assert rows(db) == 10
        filler.unlink()
        assert await writer.write(insert(os.urandom(3_000_000))) == 11

    with Database(small_disk / "node.db") as db:
        with db.transaction() as conn:
            conn.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        writer = GroupWriter(db).start()
        try:
            asyncio.run(scenario(db, writer))
        finally:
            writer.stop()
        assert db.reader().execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_compaction_on_a_full_disk_keeps_the_file_whole_and_shrinks_it_once_there_is_room(
    small_disk: Path,
) -> None:
    """What the guard does when the disk is tight: hand free pages back. On a disk with no
    room at all even that is refused; the file must stay whole, and shrink later."""
    with Database(small_disk / "node.db") as db:
        with db.transaction() as conn:
            conn.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
            conn.executemany(
                "INSERT INTO blobs (data) VALUES (?)", [(os.urandom(8000),) for _ in range(250)]
            )
        with db.transaction() as conn:
            conn.execute("DELETE FROM blobs WHERE id % 2 = 0")
        db.checkpoint()
        kept = db.reader().execute("SELECT id, data FROM blobs ORDER BY id").fetchall()
        before = os.path.getsize(db.path)
        filler = fill(small_disk)
        # The pages it moves go through the WAL first, which has no room to grow.
        with pytest.raises(UnavailableError, match="disk is full") as refused:
            db.compact(free_disk=0)
        assert refused.value.retryable
        assert db.reader().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.reader().execute("SELECT id, data FROM blobs ORDER BY id").fetchall() == kept
        filler.unlink()
        db.compact(free_disk=0)
        assert os.path.getsize(db.path) < 0.6 * before
        assert db.reader().execute("SELECT id, data FROM blobs ORDER BY id").fetchall() == kept


def test_the_resource_guard_on_a_full_disk_reports_what_it_could_not_do_and_recovers(
    small_disk: Path,
) -> None:
    with Database(small_disk / "node.db") as db:
        with db.transaction() as conn:
            conn.executemany(
                "INSERT INTO observations (agent, model, run_id, at, confidence, inputs) "
                "VALUES ('a', 'm', 'r', ?, 0.5, ?)",
                [(i, os.urandom(2000)) for i in range(1500)],
            )
        db.checkpoint()
        guard = ResourceGuard(db, small_disk, Budgets(disk_bytes=1 * MB))
        filler = fill(small_disk)
        report = guard.check()  # no exception: every step is tried, refusals are reported
        assert "trimming drift observations refused: the disk is full" in report.actions
        assert any(a.startswith("only 0 MB free") for a in report.alerts)
        assert db.reader().execute("SELECT count(*) FROM observations").fetchone()[0] == 1500
        assert db.reader().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        before = os.path.getsize(db.path)
        filler.unlink()
        # With room again, the next pass trims and hands the freed pages back.
        report = guard.check()
        assert "trimmed 500 drift observations" in report.actions
        assert any(a.startswith("compacted the database by") for a in report.actions)
        assert os.path.getsize(db.path) < 0.8 * before
        kept = db.reader().execute("SELECT min(at), count(*) FROM observations").fetchone()
        assert kept == (500, 1000)
