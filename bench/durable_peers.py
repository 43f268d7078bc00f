"""Peers of the durable-runs benchmark: LangGraph with a SQLite checkpointer, and bare SQLite.

A durable run is the demo agent's four steps, sense → reason → act → learn, where each step's
output is committed to an SQLite file (WAL, ``synchronous=FULL``) before the next step starts,
so a crash loses at most the step in flight. Both peers do the same per-step work (the pure
functions :func:`sense`, :func:`reason`, :func:`act` and :func:`learn`) and report one JSON
object of the same shape::

    {"system": ..., "runs": N, "seconds": S, "runs_per_second": R,
     "db_bytes": B, "bytes_per_run": B / N, "versions": {...}, ...}

``db_bytes`` is the main database file plus its ``-wal`` file, measured after a
``wal_checkpoint(TRUNCATE)`` and close, so it is the data the runs left behind.

* **LangGraph** (``langgraph`` + ``langgraph-checkpoint-sqlite``): a 4-node ``StateGraph``
  compiled with ``SqliteSaver`` and invoked with ``durability="sync"``, one ``thread_id`` per
  run. It runs in its own virtualenv (LangGraph's pins may conflict with edgeos'), made by
  :func:`ensure_langgraph_venv` and driven through :func:`run_langgraph`::

      python bench/durable_peers.py langgraph --runs N --db PATH [--threads T] [--payload-bytes B]

* **Bare SQLite** (:func:`bare_sqlite`, stdlib only): per run a "run started" row, one row per
  step and a "run finished" row, each its own transaction. That is the least any journal that
  commits every step pays, so it is the ceiling. With ``group=G`` it commits one row for each of
  G runs per transaction (group commit across concurrent runs), the way a durable executor gets
  past one fsync per step while keeping every step durable before its run moves on::

      python bench/durable_peers.py bare --runs N --db PATH [--group G] [--payload-bytes B]

What ``SqliteSaver`` (langgraph-checkpoint-sqlite 3.1) does to the connection: its ``setup()``
runs ``PRAGMA journal_mode=WAL`` and nothing else, so ``synchronous`` is whatever the SQLite
build defaults to (FULL for the CPython builds measured, but some builds default WAL databases
to NORMAL). The peer sets ``PRAGMA synchronous=FULL`` itself and reports both pragmas as read
back after the run. The saver guards its one connection with a ``threading.Lock`` (it is opened
with ``check_same_thread=False``), so one saver may be shared by threads, but its reads and
commits are serialised: there is no group commit.

This file must run under both virtualenvs: at module level it imports the standard library
only, and LangGraph only inside the functions that need it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import operator
import os
import platform
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, TypedDict

# Scripts here import their neighbours; -I (isolated mode) leaves the script's folder off sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from venvs import ensure_venv

REQUIREMENTS_LANGGRAPH = Path(__file__).with_name("requirements-langgraph.txt")
"""Pinned requirements of the LangGraph peer's virtualenv."""

STEPS: tuple[str, ...] = ("sense", "reason", "act", "learn")
"""The demo agent's steps, in order."""

FEATURES: tuple[str, ...] = (
    "sales_mean_7d",
    "sales_mean_28d",
    "sales_trend_7d",
    "stock_on_hand",
    "days_of_cover",
    "lead_time_days",
    "lead_time_std_days",
    "days_to_next_delivery",
    "units_on_order",
    "promo_uplift",
    "promo_days_left",
    "day_of_week_sin",
)
"""Features :func:`sense` observes: a subset of the retail demo's, kept local so that this file
runs in the LangGraph virtualenv, which does not have edgeos."""

# Fixed weights of the linear score in reason(); arbitrary, they only make the work real.
_WEIGHTS: tuple[float, ...] = (0.08, 0.03, 0.2, -0.05, -0.3, 0.15, 0.1, 0.05, -0.02, 0.6, 0.04, 0.1)
_BIAS = -1.5

_STDERR_TAIL = 4000  # characters of a failed peer's stderr shown in the error


# --- The agent's steps, shared by both peers --------------------------------------------------


def run_id(run: int) -> str:
    """Identifier of run number ``run``: LangGraph's ``thread_id``, the bare journal's key."""
    return f"run-{run:08d}"


def sense(run: int, payload_bytes: int = 0) -> dict[str, Any]:
    """Observe: ~12 float features drawn from an RNG seeded by the run number.

    Rounded to 4 decimals like a sensor reading, which keeps a step's journal entry near the
    ~300 bytes the edgeos demo agent journals. ``payload_bytes`` adds an opaque observation of
    that size, to see how either journal scales with larger steps.
    """
    rng = random.Random(run)
    out: dict[str, Any] = {
        "features": {name: round(rng.uniform(0.0, 40.0), 4) for name in FEATURES}
    }
    if payload_bytes > 0:
        out["observation"] = "x" * payload_bytes
    return out


def reason(features: dict[str, float]) -> dict[str, Any]:
    """Decide: a logistic score over the features (pure Python; the benchmark is not about
    model inference, which the runtime benchmarks cover)."""
    z = _BIAS + sum(w * features[name] / 40.0 for w, name in zip(_WEIGHTS, FEATURES, strict=True))
    return {"score": round(1.0 / (1.0 + math.exp(-z)), 6)}


def act(rid: str, features: dict[str, float], score: float) -> dict[str, Any]:
    """Act: a reorder effect whose idempotency key lets a replay after a crash skip it."""
    demand = features["sales_mean_7d"] * (features["lead_time_days"] + 1.0)
    quantity = max(1, math.ceil(demand * (0.5 + score) - features["stock_on_hand"]))
    effect = {
        "kind": "reorder",
        "sku": f"sku-{int(features['units_on_order'] * 1000) % 997:03d}",
        "quantity": quantity,
        "idempotency_key": f"{rid}/act/0",
    }
    return {"effects": [effect]}


def learn(score: float, effects: list[dict[str, Any]]) -> dict[str, Any]:
    """Learn: record the outcome that a later training run would use."""
    ordered = sum(int(e["quantity"]) for e in effects)
    return {"outcome": {"predicted": score, "ordered": ordered, "reward": round(score * 2 - 1, 6)}}


# --- Bare SQLite: the ceiling -------------------------------------------------------------------


def _open(path: Path, *, autocommit: bool) -> sqlite3.Connection:
    """Open a new database file in WAL mode with ``synchronous=FULL``: every commit is fsynced
    before it returns, as the edgeos journal requires.

    ``autocommit=True`` (bare SQLite) leaves transactions to explicit BEGIN/COMMIT. Otherwise
    the connection is opened as ``SqliteSaver.from_conn_string`` opens it: the sqlite3 module's
    implicit transactions, and ``check_same_thread=False`` since the saver's lock serialises
    every use of it.
    """
    if path.exists():
        # Results would mix with an earlier run's pages and rows.
        raise FileExistsError(f"{path} exists; the benchmark needs a new database file")
    path.parent.mkdir(parents=True, exist_ok=True)
    if autocommit:
        conn = sqlite3.connect(path, isolation_level=None)
    else:
        conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _pragmas(conn: sqlite3.Connection) -> dict[str, Any]:
    return {
        "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
        "synchronous": {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
            conn.execute("PRAGMA synchronous").fetchone()[0], "?"
        ),
    }


def _close_and_measure(conn: sqlite3.Connection, path: Path) -> int:
    """Checkpoint the WAL into the main file, close, and return main file + WAL bytes."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def _result(system: str, runs: int, seconds: float, db_bytes: int, **extra: Any) -> dict[str, Any]:
    return {
        "system": system,
        "runs": runs,
        "seconds": round(seconds, 6),
        "runs_per_second": round(runs / seconds, 2) if seconds > 0 else None,
        "db_bytes": db_bytes,
        "bytes_per_run": round(db_bytes / runs, 1) if runs else None,
        **extra,
    }


def _base_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}


def _journal(run: int, steps: int, payload_bytes: int) -> Iterator[tuple[str, str]]:
    """The rows one run journals, as (kind, JSON payload), one step at a time.

    A generator, so that a step runs only when the caller asks for its row, i.e. after the
    previous row was committed, as in a durable executor. Each step's entry holds its input and
    output, as a journal that can replay or audit a step needs. ``steps`` other than 4 repeats
    (or cuts short) the demo agent's cycle of steps.
    """
    rid = run_id(run)
    yield "started", _json({"run_id": rid, "agent": "demo", "input": {"run": run}})
    state: dict[str, Any] = {}
    for i in range(steps):
        step = STEPS[i % len(STEPS)]
        if step == "sense":
            state["input"], output = {"run": run}, sense(run, payload_bytes)
            state["features"] = output["features"]
        elif step == "reason":
            state["input"], output = {"features": state["features"]}, reason(state["features"])
            state["score"] = output["score"]
        elif step == "act":
            state["input"] = {"score": state["score"]}
            output = act(rid, state["features"], state["score"])
            state["effects"] = output["effects"]
        else:
            state["input"] = {"score": state["score"], "effects": state["effects"]}
            output = learn(state["score"], state["effects"])
            state["outcome"] = output["outcome"]
        yield "step", _json({"step": step, "input": state["input"], "output": output})
    yield "finished", _json({"run_id": rid, "status": "succeeded", "outcome": state.get("outcome")})


def _json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))


def bare_sqlite(
    runs: int, path: Path, steps: int = 4, group: int = 1, *, payload_bytes: int = 0
) -> dict[str, Any]:
    """Journal ``runs`` runs into a new SQLite file at ``path`` and time it.

    Per run: a "started" row, ``steps`` step rows (JSON of each step's input and output, ~300
    bytes) and a "finished" row. ``group=1`` commits each row in its own transaction;
    ``group=G`` advances G runs in lockstep and commits their rows for the same phase in one
    transaction, so every step is still durable before its run's next step, at 1/G of the
    fsyncs. ``steps`` other than 4 repeats or cuts short the demo agent's cycle of steps, to
    see how the cost scales with run length.

    The table is a plain rowid table with no secondary index: the least a journal can write.
    """
    if runs < 1 or steps < 1 or group < 1:
        raise ValueError("runs, steps and group must be at least 1")
    conn = _open(path, autocommit=True)
    conn.execute(
        "CREATE TABLE journal (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, "
        "seq INTEGER NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL)"
    )
    insert = "INSERT INTO journal (run_id, seq, kind, payload) VALUES (?, ?, ?, ?)"
    transactions = 0
    start = time.perf_counter()
    for first in range(0, runs, group):
        batch = range(first, min(first + group, runs))
        journals = [(run_id(run), _journal(run, steps, payload_bytes)) for run in batch]
        for seq in range(steps + 2):
            # Each run's next row (running its next step) only now that the last one is durable.
            rows = [(rid, seq, *next(journal)) for rid, journal in journals]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(insert, rows)
            conn.execute("COMMIT")
            transactions += 1
    seconds = time.perf_counter() - start
    pragmas = _pragmas(conn)
    db_bytes = _close_and_measure(conn, path)
    return _result(
        "bare-sqlite",
        runs,
        seconds,
        db_bytes,
        group=group,
        steps=steps,
        transactions_per_run=round(transactions / runs, 3),
        pragmas=pragmas,
        versions=_base_versions(),
    )


# --- LangGraph peer (runs in its own virtualenv) -----------------------------------------------


class AgentState(TypedDict, total=False):
    """LangGraph state of one run; ``effects`` accumulates (reducer: list concatenation)."""

    run: int
    run_id: str
    features: dict[str, float]
    observation: str
    score: float
    effects: Annotated[list[dict[str, Any]], operator.add]
    outcome: dict[str, Any]


def _build_graph(payload_bytes: int) -> Any:
    """The 4-node sense → reason → act → learn ``StateGraph`` builder (not yet compiled)."""
    from langgraph.graph import END, START, StateGraph

    def sense_node(state: AgentState) -> dict[str, Any]:
        return sense(state["run"], payload_bytes)

    def reason_node(state: AgentState) -> dict[str, Any]:
        return reason(state["features"])

    def act_node(state: AgentState) -> dict[str, Any]:
        return act(state["run_id"], state["features"], state["score"])

    def learn_node(state: AgentState) -> dict[str, Any]:
        return learn(state["score"], state["effects"])

    builder = StateGraph(AgentState)
    nodes: list[tuple[str, Callable[[AgentState], dict[str, Any]]]] = [
        ("sense", sense_node),
        ("reason", reason_node),
        ("act", act_node),
        ("learn", learn_node),
    ]
    previous = START
    for name, fn in nodes:
        builder.add_node(name, fn)
        builder.add_edge(previous, name)
        previous = name
    builder.add_edge(previous, END)
    return builder


def _langgraph_versions() -> dict[str, str]:
    versions = _base_versions()
    for dist in ("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite"):
        versions[dist] = importlib.metadata.version(dist)
    return versions


def langgraph_peer(
    runs: int, path: Path, threads: int = 1, *, payload_bytes: int = 0
) -> dict[str, Any]:
    """Invoke the 4-node graph ``runs`` times with ``SqliteSaver`` on a new file at ``path``.

    Each run has its own ``thread_id`` and uses ``durability="sync"``: LangGraph waits for each
    step's checkpoint to be written before it starts the next step, the same guarantee as the
    edgeos journal. ``threads > 1`` splits the runs over that many threads sharing one compiled
    graph and one saver (thread-safe; see the module docstring). Must run where LangGraph is
    installed.
    """
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.checkpoint.sqlite import SqliteSaver

    if runs < 1 or threads < 1:
        raise ValueError("runs and threads must be at least 1")
    builder = _build_graph(payload_bytes)

    # Warm up LangGraph's lazily built code paths (serializers, channel types) without touching
    # the measured file, so the timing starts from a process in its steady state.
    warm = builder.compile(checkpointer=InMemorySaver())
    for i in range(3):
        config = {"configurable": {"thread_id": f"warmup-{i}"}}
        warm.invoke({"run": -1 - i, "run_id": f"warmup-{i}"}, config, durability="sync")

    # The connection as SqliteSaver.from_conn_string opens it (check_same_thread=False, its lock
    # makes sharing safe), plus an explicit synchronous=FULL: SqliteSaver only sets WAL.
    conn = _open(path, autocommit=False)
    saver = SqliteSaver(conn)
    saver.setup()  # creates the tables now rather than inside the first timed run
    graph = builder.compile(checkpointer=saver)

    # Count the transactions the runs commit (each one an fsync of the WAL), to set beside the
    # bare journal's. The callback costs well under 1% of a run; it only runs under the saver's
    # lock, so the counter needs no lock of its own.
    commits = 0

    def trace(statement: str) -> None:
        nonlocal commits
        if statement.startswith("COMMIT"):
            commits += 1

    conn.set_trace_callback(trace)

    def invoke(run: int) -> None:
        rid = run_id(run)
        config = {"configurable": {"thread_id": rid}}
        graph.invoke({"run": run, "run_id": rid}, config, durability="sync")

    def worker(offset: int) -> None:
        for run in range(offset, runs, threads):
            invoke(run)

    start = time.perf_counter()
    if threads == 1:
        worker(0)
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lg-run") as pool:
            for future in [pool.submit(worker, t) for t in range(threads)]:
                future.result()  # re-raises a worker's exception
    seconds = time.perf_counter() - start
    conn.set_trace_callback(None)

    # Sanity checks outside the timing: every run left checkpoints, and the last one finished.
    with saver.lock:
        stored = conn.execute("SELECT COUNT(DISTINCT thread_id) FROM checkpoints").fetchone()[0]
        checkpoints = conn.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]
        writes = conn.execute("SELECT COUNT(*) FROM writes").fetchone()[0]
    if stored != runs:
        raise RuntimeError(f"{stored} of {runs} runs have checkpoints")
    last = graph.get_state({"configurable": {"thread_id": run_id(runs - 1)}})
    if "outcome" not in last.values or last.next:
        raise RuntimeError(f"the last run did not finish: next={last.next}")
    with saver.lock:
        pragmas = _pragmas(conn)
        db_bytes = _close_and_measure(conn, path)
    return _result(
        "langgraph",
        runs,
        seconds,
        db_bytes,
        threads=threads,
        transactions_per_run=round(commits / runs, 3),
        checkpoint_rows_per_run=round(checkpoints / runs, 3),
        write_rows_per_run=round(writes / runs, 3),
        pragmas=pragmas,
        versions=_langgraph_versions(),
    )


# --- Driving the peer from the main virtualenv --------------------------------------------------


def ensure_langgraph_venv(path: Path) -> Path:
    """Create or refresh the LangGraph peer's virtualenv at ``path``; return its interpreter."""
    return ensure_venv(path, REQUIREMENTS_LANGGRAPH, label="LangGraph venv")


def run_langgraph(
    python: Path,
    runs: int,
    db: Path,
    threads: int = 1,
    *,
    payload_bytes: int = 0,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Run the LangGraph peer under ``python`` (the LangGraph venv's) and return its result.

    Pass the venv's ``bin/python`` as is, not ``Path.resolve()``-d: resolving follows its
    symlink to the base interpreter, which does not see the venv's packages.

    ``-I`` keeps the child to its own virtualenv: no PYTHONPATH, no user site-packages, and not
    this directory on ``sys.path``, so nothing of edgeos' environment leaks into the peer.
    LangSmith tracing is turned off whatever the caller's environment says: it would add
    network calls to every run and measure something else.
    """
    cmd = [
        str(python),
        "-I",
        str(Path(__file__).resolve()),
        "langgraph",
        *("--runs", str(runs), "--db", str(db), "--threads", str(threads)),
        *("--payload-bytes", str(payload_bytes)),
    ]
    env = {**os.environ, "LANGSMITH_TRACING": "false", "LANGCHAIN_TRACING_V2": "false"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if proc.returncode != 0:
        tail = proc.stderr[-_STDERR_TAIL:]
        raise RuntimeError(f"LangGraph peer exited with code {proc.returncode}:\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError("LangGraph peer printed no result")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- Command line -------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def main(argv: list[str] | None = None) -> None:
    """Run one peer and print its result as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="peer", required=True)
    lg = sub.add_parser("langgraph", help="LangGraph + SqliteSaver (needs LangGraph installed)")
    lg.add_argument("--threads", type=_positive, default=1, help="concurrent threads of runs")
    bare = sub.add_parser("bare", help="bare SQLite commit loop (standard library only)")
    bare.add_argument("--group", type=_positive, default=1, help="runs committed together")
    for p in (lg, bare):
        p.add_argument("--runs", type=_positive, required=True, help="number of runs")
        p.add_argument("--db", type=Path, required=True, help="new SQLite file to write")
        p.add_argument(
            "--payload-bytes", type=_non_negative, default=0, help="extra bytes sensed per run"
        )
    args = parser.parse_args(argv)
    try:
        if args.peer == "langgraph":
            result = langgraph_peer(
                args.runs, args.db, args.threads, payload_bytes=args.payload_bytes
            )
        else:
            result = bare_sqlite(
                args.runs, args.db, group=args.group, payload_bytes=args.payload_bytes
            )
    except FileExistsError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
