"""Power loss: a real node SIGKILLed during start-up, a model swap and journal writes.

SIGKILL is the closest a test gets to pulling the plug: no shutdown code runs, and the
next start finds whatever was on disk at that instant. (The page cache survives a
SIGKILL where it would not survive a power cut; ``synchronous=FULL`` and the fsyncs of
model files and their directory cover that difference, which these tests cannot show.)

Each scenario kills many times, at random moments and at chosen ones: a kill can wait
until ``/proc`` shows one of the process's threads inside a write or fsync of the
database or a model file, so the moments that matter are hit for certain rather than by
luck. Then it checks the node comes back consistent:

- start-up: fresh data directories killed while the database file is created, its header
  written and the migrations run (until several kills landed before they committed), and
  a node with unfinished runs killed anywhere between spawn and ready;
- model swap: the ``edgeos model`` CLI, and a loop over the registry API that adds
  versions, switches the default and removes versions, killed mid-swap (also while
  writing a model file or the database) while the node serves inference; sometimes the
  node is killed with them;
- journal writes: a busy agent with large step outputs, the node killed while it syncs
  its WAL, with more runs submitted over the API until the moment of the kill.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import random
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from edgeos.agents import manage, store
from edgeos.demo.supplier import SupplierService
from edgeos.node.process import ServerProcess, node_process
from edgeos.runtime import ModelRegistry
from edgeos.state import MIGRATIONS, Database, outbox
from tests import onnx_models
from tests.test_full_disk import check_consistent

pytestmark = pytest.mark.slow

MIGRATION_NAMES = [m.name for m in MIGRATIONS]


# -- helpers --------------------------------------------------------------------------------
def spawn(data_dir: Path) -> subprocess.Popen[bytes]:
    """Start ``edgeos node run`` without waiting for it to be ready."""
    command = node_process(data_dir).command
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL, as a power cut: nothing of the shutdown runs."""
    process.kill()
    process.wait()


def migration_rows(db_path: Path) -> list[str] | None:
    """The migrations recorded in a database file, read with plain SQLite (``Database``
    would apply the missing ones); None when the table is not there (yet).

    Not read-only: opening may have to roll back a transaction the kill cut short.
    """
    if not db_path.exists():
        return None
    conn = sqlite3.connect(db_path)
    try:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'edgeos_migrations'"
        ).fetchone()
        if found is None:
            return None
        return [name for (name,) in conn.execute("SELECT name FROM edgeos_migrations")]
    finally:
        conn.close()


# Linux system calls that write or sync a file, by machine: what a thread is in while it
# commits to the database or its WAL.
WRITE_CALLS = {
    "x86_64": {1: "write", 18: "pwrite64", 74: "fsync", 75: "fdatasync"},
    "aarch64": {64: "write", 68: "pwrite64", 82: "fsync", 83: "fdatasync"},
}


DATABASE_FILES = re.compile(r"/node\.db(-wal)?$")
MODEL_FILES = re.compile(r"/sha256/[0-9a-f]{64}\.(onnx|tmp-[0-9]+)$")


def syscalls_visible(pid: int) -> bool:
    """Whether this test may see what a child's threads are doing (Linux, a known
    machine, and ptrace access to the child, which Yama's strictest modes refuse)."""
    if platform.machine() not in WRITE_CALLS:
        return False
    try:
        Path(f"/proc/{pid}/syscall").read_text()
    except OSError:
        return False
    return True


def kill_while_writing(
    process: subprocess.Popen[bytes], timeout: float, files: re.Pattern[str] = DATABASE_FILES
) -> str | None:
    """SIGKILL the process the moment one of its threads is seen writing or syncing a file
    whose path matches ``files`` (``/proc/PID/task/*/syscall``); returns the call and the
    file.

    If none is seen within ``timeout`` (or this machine's calls are unknown), kills it
    anyway and returns None.
    """
    calls = WRITE_CALLS.get(platform.machine(), {})
    pid = process.pid
    deadline = time.monotonic() + timeout
    while calls and time.monotonic() < deadline:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
                call = calls.get(int(fields[0]))
                if call is None:
                    continue
                target = os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}")
            except (OSError, ValueError, IndexError):  # the thread ended, or "running"
                continue
            if files.search(target):
                kill(process)
                name = Path(target).name  # a blob's name shortened: sha256 prefix and suffix
                return f"{call}({name if len(name) < 20 else name[:8] + '...' + name[64:]})"
    kill(process)
    return None


def node_log(node: ServerProcess) -> str:
    return node.log()[-4000:]


# -- (a) start-up ---------------------------------------------------------------------------
QUIET_AGENT = """
import time

def first(ctx, data):
    time.sleep(0.01)
    return {"n": data["n"], "seen": ctx.random().random()}

def second(ctx, data):
    return {**data, "done": True}
"""


def test_killed_during_start_up_the_node_comes_back_consistent(tmp_path: Path) -> None:
    rng = random.Random(11)
    # 1. Fresh data directories, killed as soon as the database file appears (give or take
    # a few ms): inside creating the file, setting WAL mode and running the migrations.
    # Every migration runs in one transaction: after the kill all of them are recorded,
    # or none.
    outcomes: Counter[str] = Counter()
    cut_short = ("killed creating the file", "killed writing its header", "killed migrating")
    deadline = time.monotonic() + 20
    attempt = 0
    while sum(outcomes[o] for o in cut_short) < 4 or attempt < 8:
        assert time.monotonic() < deadline, f"never killed mid-migration: {outcomes}"
        data_dir = tmp_path / f"fresh-{attempt}"
        attempt += 1
        db_path = data_dir / "node.db"
        process = spawn(data_dir)
        try:
            while not db_path.exists() and process.poll() is None:
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, 0.01))
        finally:
            kill(process)
        hot_journal = db_path.with_name("node.db-journal").exists()
        wal = db_path.with_name("node.db-wal").exists()
        recorded = migration_rows(db_path)
        if recorded:
            assert sorted(recorded) == sorted(MIGRATION_NAMES), recorded  # all, never some
            outcomes["killed after migrating"] += 1
        elif hot_journal:  # application_id is written before WAL mode is on
            outcomes["killed writing its header"] += 1
        else:
            # WAL mode is on: killed in (or just before) the migrations' transaction.
            outcomes["killed migrating" if wal else "killed creating the file"] += 1
        # Opened as the next start opens it: every migration recorded once, file intact.
        with Database(db_path) as db:
            assert db.applied_migrations() == MIGRATION_NAMES
            assert db.reader().execute("PRAGMA integrity_check").fetchall() == [("ok",)]

    # 2. A node with unfinished runs, killed anywhere between spawn and ready.
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "agent.py").write_text(textwrap.dedent(QUIET_AGENT))
    (bundle / "agent.yaml").write_text(
        yaml.safe_dump({"name": "quiet", "version": "1", "steps": ["first", "second"]})
    )
    with Database(data_dir / "node.db") as db:
        manage.add_agent(db, bundle, data_dir / "agents", models=[], connectors=[])
        runs = [manage.queue_run(db, "quiet", {"n": i}) for i in range(40)]
    started = time.monotonic()
    with node_process(data_dir) as node:
        ready_after = time.monotonic() - started
        node.kill()
    for _ in range(10):
        process = spawn(data_dir)
        time.sleep(rng.uniform(0.0, ready_after * 1.2))
        kill(process)
        with Database(data_dir / "node.db") as db:
            check_consistent(db)
    with node_process(data_dir) as node, Database(data_dir / "node.db") as db:
        until = time.monotonic() + 20
        while store.state_counts(db) != {"succeeded": len(runs)}:
            assert time.monotonic() < until, (store.state_counts(db), node_log(node))
            time.sleep(0.05)
    with Database(data_dir / "node.db") as db:
        check_consistent(db)
        assert db.applied_migrations() == MIGRATION_NAMES
        counted = (
            db.reader()
            .execute("SELECT count(*), count(DISTINCT name) FROM edgeos_migrations")
            .fetchone()
        )
        assert counted == (len(MIGRATION_NAMES), len(MIGRATION_NAMES))
    print(
        f"fresh start-ups killed {attempt} times: {dict(outcomes)}; ready after {ready_after:.2f} s"
    )


# -- (b) model swap -------------------------------------------------------------------------
FEATURES = 256

# A child process that swaps models over the registry API until it is killed.
SWAPPER = """
import random
import sys
from pathlib import Path

import onnxruntime  # noqa: F401  (imported now, so kills land in the swaps, not the import)

from edgeos.runtime import ModelRegistry
from edgeos.state import Database

data_dir, models, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
files = sorted(models.glob("*.onnx"))
rng = random.Random(seed)
with Database(data_dir / "node.db") as db:
    registry = ModelRegistry(db, data_dir / "models")
    print("ready", flush=True)
    while True:
        versions = [m.version for m in registry.versions("scorer")]
        if len(versions) > 4:  # few versions: most adds write a new file, removes delete
            registry.remove("scorer", rng.choice(versions))
        elif rng.random() < 0.6:
            registry.add(rng.choice(files), name="scorer", make_default=rng.random() < 0.5)
        else:
            registry.set_default("scorer", rng.choice(versions))
        print("swapped", flush=True)
"""


def check_registry(db: Database, store_dir: Path) -> set[Path]:
    """Every row's file is there with its sha256, and one default per model; returns the
    files no row refers to (left by an add or remove cut short)."""
    conn = db.reader()
    referenced = set()
    for name, version, sha256 in conn.execute(
        "SELECT name, version, sha256 FROM model_versions"
    ).fetchall():
        path = store_dir / "sha256" / f"{sha256}.onnx"
        assert path.exists(), f"{name}:{version} has no file"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256, f"{name}:{version}"
        referenced.add(path)
    defaults = conn.execute(
        "SELECT name, sum(is_default) FROM model_versions GROUP BY name"
    ).fetchall()
    assert all(count == 1 for _, count in defaults), defaults
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    present = set((store_dir / "sha256").iterdir())
    return present - referenced


def test_killed_during_model_swaps_the_registry_stays_consistent(tmp_path: Path) -> None:
    rng = random.Random(5)
    models = tmp_path / "models"
    models.mkdir()
    # Different weights, so each file is its own blob; big enough (~2 MB) that writing
    # and syncing one takes a moment a kill can land in.
    for seed in range(12):
        onnx_models.mlp(models / f"scorer-{seed}.onnx", features=FEATURES, hidden=2048, seed=seed)
    data_dir = tmp_path / "node"
    store_dir = data_dir / "models"
    with Database(data_dir / "node.db") as db:
        ModelRegistry(db, store_dir).add(models / "scorer-0.onnx", name="scorer")
    swapper = tmp_path / "swapper.py"
    swapper.write_text(textwrap.dedent(SWAPPER))

    served: Counter[str] = Counter()
    failures: list[str] = []
    stop = threading.Event()
    features = np.random.default_rng(0).standard_normal(FEATURES).astype(float).tolist()
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, FEATURES],
                        "data": features}]}  # fmt: skip
    current: list[ServerProcess] = []  # the node now up (a new one after each restart)

    def serve() -> None:
        with httpx.Client(timeout=10.0) as client:
            while not stop.is_set():
                try:
                    answer = client.post(
                        f"{current[-1].url}/v2/models/scorer/infer",
                        json=body,
                        headers=current[-1].headers,
                    )
                except httpx.TransportError:  # the node was killed: wait for the next one
                    time.sleep(0.02)
                    continue
                if answer.status_code == 200:
                    served[answer.json()["model_version"]] += 1
                else:
                    failures.append(f"{answer.status_code} {answer.text}")

    def serves_default(node: ServerProcess) -> str:
        """The version the node serves by default, once it has seen the registry."""
        with Database(data_dir / "node.db") as db:
            default = ModelRegistry(db, store_dir).default_version("scorer")
        time.sleep(0.3)  # the node re-reads the registry within 250 ms
        answer = httpx.post(
            f"{node.url}/v2/models/scorer/infer", json=body, headers=node.headers, timeout=10.0
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == default
        return default

    kills: Counter[str] = Counter()
    server = threading.Thread(target=serve, name="inference")
    with contextlib.ExitStack() as nodes:  # every node started is stopped and closed
        node = nodes.enter_context(node_process(data_dir))
        current.append(node)
        server.start()
        try:
            # The CLI, as a person runs it, killed at random moments of its life.
            cli = [sys.executable, "-m", "edgeos", "model"]
            started = time.monotonic()
            subprocess.run(
                [*cli, "add", str(models / "scorer-1.onnx"), "--name", "scorer", "--default",
                 "--data-dir", str(data_dir)],
                check=True, capture_output=True,
            )  # fmt: skip
            cli_seconds = time.monotonic() - started
            for command in (
                ["add", str(models / "scorer-2.onnx"), "--name", "scorer", "--default"],
                ["default", "scorer:1"],
                ["add", str(models / "scorer-3.onnx"), "--name", "scorer", "--default"],
            ):
                with subprocess.Popen(
                    [*cli, *command, "--data-dir", str(data_dir)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ) as process:
                    time.sleep(rng.uniform(0.2, 0.8) * cli_seconds)
                    kills["cli" if process.poll() is None else "cli done before the kill"] += 1
                    kill(process)
            # The registry API in a loop, killed in the middle of its swaps: the moment it
            # writes a model file or the database, or at a random moment together with the
            # node, which is then loading and serving the versions the swaps make default.
            for attempt in range(9):
                with subprocess.Popen(
                    [sys.executable, str(swapper), str(data_dir), str(models), str(attempt)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                ) as process:
                    assert process.stdout is not None
                    line = process.stdout.readline()
                    assert line == b"ready\n", process.communicate()[1].decode()[-2000:]
                    time.sleep(rng.uniform(0.05, 0.4))
                    if attempt % 3 == 0:
                        node.kill()
                        kill(process)
                        kills["node and swapper"] += 1
                    else:
                        files = MODEL_FILES if attempt % 3 == 1 else DATABASE_FILES
                        hit = kill_while_writing(process, timeout=0.5, files=files)
                        kills[f"swapper in {hit}" if hit else "swapper"] += 1
                    kills["swaps done"] += process.stdout.read().count(b"swapped")
                with Database(data_dir / "node.db") as db:
                    check_registry(db, store_dir)
                if node.returncode != -1:  # back after the power cut: serving the default
                    node = nodes.enter_context(node_process(data_dir))
                    current.append(node)
                    serves_default(node)
            with Database(data_dir / "node.db") as db:
                leftovers = check_registry(db, store_dir)
                # What interrupted adds and removes left, the next sweep deletes.
                assert set(ModelRegistry(db, store_dir).sweep(grace=0.0)) == leftovers
                assert check_registry(db, store_dir) == set()
            default = serves_default(node)
        finally:
            stop.set()
            if server.is_alive():
                server.join()
    assert sum(served.values()) > 0
    # A request for the default can be routed to a version removed an instant later: it
    # fails (404 for the version, or its file gone), the next one goes to the new default.
    # Nothing may fail as a server error.
    assert not [f for f in failures if f.startswith("5")], failures
    print(
        f"kills: {dict(kills)}; {sum(served.values())} inferences served by "
        f"{len(served)} versions, {len(failures)} failed, default now {default}; "
        f"{len(leftovers)} leftover files "
        f"swept: {sorted(p.name for p in leftovers)}; failures: {failures[:3]}"
    )


# -- (c) journal writes ---------------------------------------------------------------------
# Kills that must land while the node writes its database, before the test may end.
WRITE_KILLS = 8

BUSY_AGENT = """
def gather(ctx, data):
    # Large outputs make each group commit write many WAL pages: a wide target.
    return {"sku": data["sku"], "readings": [ctx.random().random() for _ in range(2500)]}

def decide(ctx, data):
    return {**data, "qty": 1 + int(sum(data["readings"])) % 9}

def act(ctx, data):
    ctx.effect("supplier.reorder", {"store": "store-03", "sku": data["sku"], "qty": data["qty"]})
    return data

def close(ctx, data):
    return {"sku": data["sku"], "ordered": data["qty"]}
"""


def test_killed_during_journal_writes_nothing_is_lost_or_doubled(tmp_path: Path) -> None:
    rng = random.Random(7)
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "agent.py").write_text(textwrap.dedent(BUSY_AGENT))
    (bundle / "agent.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "busy",
                "version": "1",
                "steps": ["gather", "decide", "act", "close"],
                "connectors": ["supplier"],
                "budgets": {"max_concurrent_runs": 16},
            }
        )
    )
    mid_write: Counter[str] = Counter()
    kills = 0
    wanted = WRITE_KILLS  # kills while writing; none where this test cannot see them
    acknowledged: list[str] = []  # queued before, or answered 201 by the node: promises
    refused: list[str] = []

    def feed(node: ServerProcess, stop: threading.Event) -> None:
        """Submit runs over the API until the node is killed under it."""
        with node.client(timeout=5.0) as client:
            while not stop.is_set():
                try:
                    answer = client.post("/api/agents/busy/runs", json={"input": {"sku": "A"}})
                except httpx.TransportError:
                    return  # killed mid-request: not acknowledged, whatever became of it
                if answer.status_code == 201:
                    acknowledged.append(answer.json()["run_id"])
                else:
                    refused.append(answer.text)
                time.sleep(0.02)

    with SupplierService() as supplier:
        (data_dir / "connectors.yaml").write_text(
            yaml.safe_dump(
                {
                    "supplier": {
                        "type": "http",
                        "base_url": supplier.url,
                        "operations": {"reorder": {"method": "POST", "path": "/orders"}},
                    }
                }
            )
        )
        with Database(data_dir / "node.db") as db:
            manage.add_agent(db, bundle, data_dir / "agents", models=[], connectors=["supplier"])
            acknowledged += [manage.queue_run(db, "busy", {"sku": f"Q-{i}"}) for i in range(60)]
        deadline = time.monotonic() + 40
        while True:
            assert time.monotonic() < deadline, f"not done after {kills} kills: {mid_write}"
            with Database(data_dir / "node.db") as db:
                done = not store.active_run_ids(db) and outbox.counts(db)["pending"] == 0
            if done and mid_write.total() >= wanted:
                break
            with node_process(data_dir) as node:
                assert node.process is not None
                if not syscalls_visible(node.process.pid):
                    wanted = 0  # random kills only
                stop = threading.Event()
                feeder = threading.Thread(target=feed, args=(node, stop), name="feeder")
                if mid_write.total() < wanted:  # until enough kills hit a write: more work
                    feeder.start()
                time.sleep(rng.uniform(0.05, 0.3))
                hit = kill_while_writing(node.process, timeout=0.5)
                stop.set()
                if feeder.is_alive():
                    feeder.join()
            kills += 1
            if hit is not None:
                mid_write[hit] += 1
            with Database(data_dir / "node.db") as db:  # as the kill left it
                check_consistent(db)
        with node_process(data_dir):  # started and stopped cleanly, once
            pass
        applied = supplier.keys("order")
    assert refused == []
    with Database(data_dir / "node.db") as db:
        check_consistent(db)
        runs = {run.id: run for run in store.runs(db, limit=100_000)}
        # Every acknowledged run is there and finished; so is every other run (a request
        # cut off by a kill may or may not have started one).
        assert set(acknowledged) <= set(runs)
        assert {run.state for run in runs.values()} == {"succeeded"}
        effects = [e for run_id in runs for e in outbox.for_run(db, run_id)]
    # One order per run, each applied by the supplier exactly once (repeats deduplicated).
    assert sorted(e.run_id for e in effects) == sorted(runs)
    assert set(applied) == {e.key for e in effects}
    print(
        f"{len(runs)} runs ({len(acknowledged)} acknowledged), {kills} kills, "
        f"{mid_write.total()} of them while writing "
        f"the database: {dict(mid_write)}, "
        f"{sum(applied.values()) - len(applied)} repeated deliveries deduplicated"
    )
