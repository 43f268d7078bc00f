"""Durable runs per second and journal bytes per run: edgeos vs LangGraph vs bare SQLite.

Every system runs the same 4-step agent (sense → reason → act → learn, the pure
functions in ``durable_peers.py``) and commits each step to an SQLite file in WAL mode
with ``synchronous=FULL`` before the next step starts. Printed side by side, in one run:

* edgeos: the durable executor with its group writer, with 1 run at a time and with many
  concurrent runs (each run still waits for its own step to be durable);
* LangGraph with ``SqliteSaver`` and ``durability="sync"`` (its own virtualenv);
* bare SQLite, one commit per step (group 1) and one commit per 16 runs' steps: the ceiling.

Goal: edgeos at least 5x LangGraph's runs per second.

    python bench/durable_runs.py [--runs 2000] [--langgraph-runs 500] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import durable_peers  # noqa: E402
from edgeos.agents import manage, store  # noqa: E402
from edgeos.agents.executor import Executor  # noqa: E402
from edgeos.state import Database  # noqa: E402
from edgeos.state.writer import GroupWriter  # noqa: E402

AGENT = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
import durable_peers as peers

def sense(ctx, data):
    return peers.sense(data["run"])

def reason(ctx, data):
    return {{**data, **peers.reason(data["features"])}}

def act(ctx, data):
    out = peers.act(ctx.run_id, data["features"], data["score"])
    for effect in out["effects"]:
        ctx.effect("supplier.reorder", effect)
    return {{**data, **out}}

def learn(ctx, data):
    return peers.learn(data["score"], data["effects"])
"""


def db_bytes(path: Path) -> int:
    """Main file plus WAL after a checkpoint: what the runs left behind."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def edgeos_runs(runs: int, concurrency: int, root: Path) -> dict[str, Any]:
    """Time ``runs`` runs of the 4-step agent through the durable executor."""
    bundle = root / "bundle"
    bundle.mkdir(parents=True)
    (bundle / "agent.py").write_text(textwrap.dedent(AGENT))
    (bundle / "agent.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "bench",
                "version": "1",
                "steps": ["sense", "reason", "act", "learn"],
                "connectors": ["supplier"],
                "budgets": {"max_concurrent_runs": concurrency},
            }
        )
    )
    path = root / "node.db"
    with Database(path) as db:
        manage.add_agent(db, bundle, root / "agents", models=[], connectors=["supplier"])
        base = db_bytes(path)

        async def go() -> tuple[float, int, int]:
            writer = GroupWriter(db).start()
            executor = Executor(db, writer)
            await executor.start()
            start = time.perf_counter()
            ids = await asyncio.gather(
                *(executor.submit("bench", data={"run": i}) for i in range(runs))
            )
            for run_id in ids:
                await executor.wait(run_id, timeout=600)
            seconds = time.perf_counter() - start
            await executor.stop()
            writer.stop()
            return seconds, writer.groups, writer.writes

        seconds, groups, writes = asyncio.run(go())
        done = store.state_counts(db, "bench").get("succeeded", 0)
        if done != runs:
            raise SystemExit(f"edgeos finished {done} of {runs} runs")
    used = db_bytes(path) - base
    return {
        "system": f"edgeos, {concurrency} concurrent",
        "runs": runs,
        "seconds": seconds,
        "runs_per_second": runs / seconds,
        "bytes_per_run": used / runs,
        "commits_per_run": groups / runs,
        "writes_per_run": writes / runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--langgraph-runs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--langgraph-venv", type=Path, default=HERE.parent / ".venv-langgraph")
    parser.add_argument("--skip-langgraph", action="store_true")
    args = parser.parse_args(argv)
    console = Console()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeos-durable-") as tmp:
        root = Path(tmp)
        langgraph = None
        if not args.skip_langgraph:
            python = durable_peers.ensure_langgraph_venv(args.langgraph_venv)
            with console.status(f"LangGraph: {args.langgraph_runs} runs"):
                langgraph = durable_peers.run_langgraph(
                    python, args.langgraph_runs, root / "langgraph.db"
                )
            langgraph["system"] = "LangGraph + SqliteSaver, sync"
            results.append(langgraph)
        for concurrency in (1, args.concurrency):
            runs = max(1, args.runs // 4) if concurrency == 1 else args.runs
            with console.status(f"edgeos: {runs} runs, {concurrency} concurrent"):
                results.append(edgeos_runs(runs, concurrency, root / f"edgeos-{concurrency}"))
        for group in (1, 16):
            with console.status(f"bare SQLite: group {group}"):
                bare = durable_peers.bare_sqlite(args.runs, root / f"bare-{group}.db", group=group)
            bare["system"] = (
                f"bare SQLite, {'a commit per step' if group == 1 else '16 runs per commit'}"
            )
            results.append(bare)

    table = Table(
        "system", "runs", "runs/s", "vs LangGraph", "bytes/run", "commits/run",
        title="Durable 4-step runs, every step committed (WAL, synchronous=FULL) before the next",
    )  # fmt: skip
    base = langgraph["runs_per_second"] if langgraph else None
    for r in results:
        commits = r.get("commits_per_run", r.get("transactions_per_run"))
        table.add_row(
            r["system"], str(r["runs"]), f"{r['runs_per_second']:,.0f}",
            f"{r['runs_per_second'] / base:.1f}x" if base else "",
            f"{r['bytes_per_run']:,.0f}", "" if commits is None else f"{commits:.2f}",
        )  # fmt: skip
    console.print(table)
    if base:
        best = max(r["runs_per_second"] for r in results if r["system"].startswith("edgeos"))
        verdict = "met" if best >= 5 * base else "NOT met"
        console.print(f"goal: edgeos >= 5x LangGraph runs/s -> {verdict} ({best / base:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
