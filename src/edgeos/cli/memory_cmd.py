"""``edgeos memory stats|search|forget|expire|replicate|restore``: agents' long-term memory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeos.agents import store as agents
from edgeos.cli.common import DataDirOption, console, node_settings, size
from edgeos.errors import ConfigError, InvalidRequestError
from edgeos.settings import NodeSettings
from edgeos.state import Database

app = typer.Typer(
    help="Agents' long-term memory: inspect, search, erase, back up.", no_args_is_help=True
)


@contextmanager
def _db(data_dir: Path | None) -> Iterator[tuple[Database, NodeSettings]]:
    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        yield db, settings


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


@app.command()
def stats(data_dir: DataDirOption = None) -> None:
    """Records, bytes, subjects and expiry per agent; the change log and its replicas."""
    with _db(data_dir) as (db, _):
        conn = db.reader()
        rows = conn.execute(
            "SELECT agent, count(*), sum(bytes), count(DISTINCT subject), min(created_at), "
            "max(created_at), sum(expires_at IS NOT NULL), group_concat(DISTINCT model) "
            "FROM memory_records GROUP BY agent ORDER BY agent"
        ).fetchall()
        log = conn.execute("SELECT count(*), max(seq) FROM memory_changes").fetchone()
        replicas = conn.execute(
            "SELECT target, position, updated_at FROM memory_replicas ORDER BY target"
        ).fetchall()
        # Each agent's current embedding model, and its records of other models.
        embedding = conn.execute(
            "SELECT m.agent, m.model, m.dim, m.done, m.total, m.since, (SELECT count(*) FROM "
            "memory_records r WHERE r.agent = m.agent AND r.model != m.model) "
            "FROM memory_models m ORDER BY m.agent"
        ).fetchall()
    table = Table("agent", "records", "bytes", "subjects", "oldest", "newest", "expiring", "model")
    for agent, n, nbytes, subjects, oldest, newest, expiring, models in rows:
        table.add_row(
            agent, str(n), size(nbytes or 0), str(subjects), _when(oldest), _when(newest),
            str(expiring), models or "",
        )  # fmt: skip
    console.print(table if rows else "no memory records")
    console.print(f"change log: {log[0]} entries, last sequence {log[1] or 0}")
    for target, position, at in replicas:
        console.print(f"replica {target}: at {position} ({_when(at)})")
    for agent, model, dim, done, total, since, left in embedding:
        if left:
            console.print(
                f"agent {agent}: embedding memory again with {model} ({dim} dimensions): "
                f"{done}/{total} records done since {_when(since)}; recall does not see the "
                f"{left} left yet"
            )
        else:
            console.print(f"agent {agent}: all memory embedded with {model} ({dim} dimensions)")


def _parse_where(where: list[str] | None) -> dict[str, object]:
    filters: dict[str, list[object]] = {}
    for item in where or []:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise InvalidRequestError(f"--where {item!r} must be FIELD=VALUE")
        filters.setdefault(name.strip(), []).append(_scalar(value))
    return {name: values[0] if len(values) == 1 else values for name, values in filters.items()}


def _scalar(text: str) -> object:
    """``true``/``false``, an integer, a number, or the text as it is."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@app.command()
def search(
    agent: Annotated[str, typer.Argument(help="The agent whose memory to search.")],
    query: Annotated[str, typer.Argument(help="What to look for, in words.")],
    k: Annotated[int, typer.Option("--k", "-k", help="How many records.")] = 5,
    where: Annotated[
        list[str] | None,
        typer.Option(help="FIELD=VALUE filter (subject or a field of memory.fields); repeatable."),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Recall an agent's records by meaning, as its steps would (ranking included)."""
    from edgeos.memory.handle import AgentMemory
    from edgeos.runtime import HostConfig, ModelHost, ModelRegistry

    filters = _parse_where(where)
    with _db(data_dir) as (db, settings):
        manifest = agents.agent(db, agent).manifest
        host = ModelHost(ModelRegistry(db, settings.model_store), HostConfig())
        try:
            memory = AgentMemory(db, host, agent, manifest.memory)
            found = memory.recall(query, k, where=filters)
            outdated = memory.outdated()
        finally:
            host.close()
    table = Table("score", "similarity", "id", "subject", "text", "metadata")
    for r in found:
        table.add_row(
            f"{r.score:.3f}", f"{r.similarity:.3f}", r.id, r.subject or "", r.text,
            ", ".join(f"{key}={value}" for key, value in r.metadata.items()),
        )  # fmt: skip
    console.print(table if found else "nothing found")
    if outdated:
        console.print(
            f"{outdated} record(s) of another embedding model were not searched: they are "
            "being embedded again with the current one (see edgeos memory stats)"
        )


@app.command()
def forget(
    subject: Annotated[
        str | None, typer.Option(help="Erase every record about this subject.")
    ] = None,
    record: Annotated[str | None, typer.Option("--id", help="Erase this record.")] = None,
    agent: Annotated[
        str | None, typer.Option(help="Only this agent's records (default: every agent).")
    ] = None,
    vacuum: Annotated[
        bool, typer.Option(help="Rebuild the file so the freed space goes back to the disk.")
    ] = True,
    data_dir: DataDirOption = None,
) -> None:
    """Erase records (text, vectors, derived rows), overwrite their bytes and reclaim space."""
    from edgeos.memory.erasure import erase, reclaim

    if (subject is None) == (record is None):
        raise InvalidRequestError("give exactly one of --subject or --id")
    with _db(data_dir) as (db, _):
        gone = erase(db, subject=subject, ids=None if record is None else [record], agent=agent)
        done = reclaim(db, vacuum=vacuum)
    console.print(
        f"erased {len(gone)} record(s); database {size(done.bytes_before)} -> "
        f"{size(done.bytes_after)}"
        + ("" if done.wal_cleared else " (the WAL is still in use: run again when idle)")
    )


@app.command()
def expire(data_dir: DataDirOption = None) -> None:
    """Remove every record whose TTL has passed (recall never returns them anyway)."""
    from edgeos.memory.retention import expire_all

    with _db(data_dir) as (db, _), db.transaction() as conn:
        gone = expire_all(conn, time.time())
    console.print(f"{len(gone)} expired record(s) removed")


def _node_id(settings: NodeSettings, node: str | None) -> str:
    if node:
        return node
    from edgeos.sync.identity import load_identity

    identity = load_identity(settings.data_dir)
    if identity is None:
        raise ConfigError("this node has not enrolled in a fleet: give its id with --node")
    return identity.device_id


@app.command()
def replicate(
    to: Annotated[Path, typer.Option("--to", help="Directory of the file replica.")],
    node: Annotated[
        str | None, typer.Option(help="This node's id (default: its fleet device id).")
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Ship the memory changes the replica lacks (resumable; never duplicates)."""
    from edgeos.memory.replication import FileTarget, sync

    with _db(data_dir) as (db, settings):
        done = sync(db, FileTarget(to), _node_id(settings, node))
    console.print(
        f"shipped {done.shipped} change(s); replica at {done.position}"
        + (" (after a snapshot of every record)" if done.snapshot else "")
    )


@app.command()
def restore(
    source: Annotated[Path, typer.Option("--from", help="Directory of the file replica.")],
    node: Annotated[str, typer.Option(help="The id of the node whose memory to restore.")],
    data_dir: DataDirOption = None,
) -> None:
    """Write another node's replicated memory here (a replacement device); repeatable."""
    from edgeos.memory.replication import FileTarget
    from edgeos.memory.replication import restore as restore_memory

    with _db(data_dir) as (db, _):
        written = restore_memory(db, FileTarget(source), node)
    console.print(f"restored {written} record(s) of node {node}")
