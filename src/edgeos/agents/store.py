"""Installed agents, their runs and escalations, as rows in the node database."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.errors import ConflictError, NotFoundError
from edgeos.state import Database

if TYPE_CHECKING:
    from edgeos.manifests.agent import AgentManifest

ACTIVE_STATES = ("pending", "running", "waiting_human", "waiting_venue", "paused")
FINAL_STATES = ("succeeded", "failed", "cancelled")
#: A run sealed into an envelope that continues on another node (edgeos.agents.migration):
#: neither active nor finished here until it comes back.
MIGRATED = "migrated"


@dataclass(frozen=True)
class InstalledAgent:
    """An agent installed on this node."""

    name: str
    version: str
    manifest: AgentManifest
    bundle_dir: str
    paused: bool
    installed_at: float


@dataclass(frozen=True)
class Run:
    """One run of an agent, as stored."""

    id: str
    agent: str
    agent_version: str
    trigger: str
    input: Any
    state: str
    next_step: str | None
    step_count: int
    carry: Any
    seed: int
    created_at: float
    updated_at: float
    finished_at: float | None
    outcome: Any
    error: str | None
    cost: float


@dataclass(frozen=True)
class EscalationRow:
    """A question to a person, open or answered."""

    id: str
    run_id: str
    step: str
    question: str
    options: list[Any]
    proposal: Any
    default: Any
    deadline: float
    state: str
    answer: Any
    note: str | None
    answered_by: str | None
    answered_at: float | None
    override: bool | None


def dumps(value: Any) -> str:
    """JSON text for a column."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def loads(text: str | None) -> Any:
    """A JSON column's value (None stays None)."""
    return None if text is None else orjson.loads(text)


# -- agents ----------------------------------------------------------------------------
def install(conn: sqlite3.Connection, manifest: AgentManifest, bundle_dir: str, at: float) -> None:
    """Install or upgrade an agent (keeping its paused flag)."""
    conn.execute(
        "INSERT INTO agents (name, version, manifest, bundle_dir, paused, installed_at) "
        "VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
        "manifest = excluded.manifest, bundle_dir = excluded.bundle_dir, "
        "installed_at = excluded.installed_at",
        (manifest.name, manifest.version, dumps(manifest.dump()), bundle_dir, at),
    )


@functools.lru_cache(maxsize=64)
def _manifest(text: str) -> AgentManifest:
    """A stored manifest, parsed once: the executor reads its agent at every run, and
    validating the manifest again each time was a third of its event loop's work (the
    manifest is frozen, so one parsed copy serves every reader)."""
    # Imported here: with no agent installed the node never needs pydantic.
    from edgeos.manifests.agent import AgentManifest

    return AgentManifest.model_validate_json(text)


def _agent(row: tuple[Any, ...]) -> InstalledAgent:
    name, version, manifest, bundle_dir, paused, installed_at = row
    return InstalledAgent(
        name, version, _manifest(manifest), bundle_dir, bool(paused), installed_at
    )


_AGENT_COLUMNS = "name, version, manifest, bundle_dir, paused, installed_at"


def agents(db: Database) -> list[InstalledAgent]:
    """Every installed agent, by name."""
    rows = db.reader().execute(f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY name")
    return [_agent(r) for r in rows]


def agent(db: Database, name: str) -> InstalledAgent:
    """One installed agent; NotFoundError if there is none."""
    row = (
        db.reader()
        .execute(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE name = ?", (name,))
        .fetchone()
    )
    if row is None:
        raise NotFoundError(f"no agent named '{name}' is installed")
    return _agent(row)


def is_paused(db: Database, name: str) -> bool:
    """Whether an agent is paused (a cheap check made before every step)."""
    row = db.reader().execute("SELECT paused FROM agents WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFoundError(f"no agent named '{name}' is installed")
    return bool(row[0])


def set_paused(conn: sqlite3.Connection, name: str, paused: bool) -> None:
    """Pause or resume an agent."""
    if conn.execute("UPDATE agents SET paused = ? WHERE name = ?", (paused, name)).rowcount == 0:
        raise NotFoundError(f"no agent named '{name}' is installed")


def remove(conn: sqlite3.Connection, name: str) -> None:
    """Uninstall an agent; refused while it has unfinished runs."""
    active = conn.execute(
        f"SELECT count(*) FROM runs WHERE agent = ? AND state IN {ACTIVE_STATES}", (name,)
    ).fetchone()[0]
    if active:
        raise ConflictError(
            f"agent '{name}' has {active} unfinished run(s); pause it and let them finish, "
            "or cancel them first"
        )
    if conn.execute("DELETE FROM agents WHERE name = ?", (name,)).rowcount == 0:
        raise NotFoundError(f"no agent named '{name}' is installed")


# -- runs ------------------------------------------------------------------------------
_RUN_COLUMNS = (
    "id, agent, agent_version, trigger, input, state, next_step, step_count, carry, seed, "
    "created_at, updated_at, finished_at, outcome, error, cost"
)


def _run(row: tuple[Any, ...]) -> Run:
    values = list(row)
    values[4] = loads(values[4])
    values[8] = loads(values[8])
    values[13] = loads(values[13])
    return Run(*values)


def run(db: Database, run_id: str) -> Run:
    """One run; NotFoundError if there is none."""
    row = db.reader().execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no run with id '{run_id}'")
    return _run(row)


def runs(
    db: Database, *, agent: str | None = None, state: str | None = None, limit: int = 100
) -> list[Run]:
    """Runs, newest first, filtered by agent and state."""
    where, args = [], []
    if agent:
        where.append("agent = ?")
        args.append(agent)
    if state:
        where.append("state = ?")
        args.append(state)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = db.reader().execute(
        f"SELECT {_RUN_COLUMNS} FROM runs {clause} ORDER BY id DESC LIMIT ?", (*args, limit)
    )
    return [_run(r) for r in rows]


def active_run_ids(db: Database, states: tuple[str, ...] = ("pending", "running")) -> list[str]:
    """Ids of runs in these states, oldest first."""
    marks = ",".join("?" * len(states))
    rows = db.reader().execute(f"SELECT id FROM runs WHERE state IN ({marks}) ORDER BY id", states)
    return [r[0] for r in rows]


def state_counts(db: Database, agent: str | None = None) -> dict[str, int]:
    """How many runs are in each state."""
    if agent:
        rows = db.reader().execute(
            "SELECT state, count(*) FROM runs WHERE agent = ? GROUP BY state", (agent,)
        )
    else:
        rows = db.reader().execute("SELECT state, count(*) FROM runs GROUP BY state")
    return {s: int(n) for s, n in rows}


# -- escalations -----------------------------------------------------------------------
_ESC_COLUMNS = (
    "id, run_id, step, question, options, proposal, default_choice, deadline, state, answer, "
    "note, answered_by, answered_at, override"
)


def _escalation(row: tuple[Any, ...]) -> EscalationRow:
    values = list(row)
    for i in (4, 5, 6, 9):
        values[i] = loads(values[i])
    values[13] = None if values[13] is None else bool(values[13])
    return EscalationRow(*values)


def escalations(db: Database, *, state: str | None = "open") -> list[EscalationRow]:
    """Escalations in a state (all when None), oldest first."""
    if state is None:
        rows = db.reader().execute(f"SELECT {_ESC_COLUMNS} FROM escalations ORDER BY rowid")
    else:
        rows = db.reader().execute(
            f"SELECT {_ESC_COLUMNS} FROM escalations WHERE state = ? ORDER BY rowid", (state,)
        )
    return [_escalation(r) for r in rows]


def escalation(db: Database, escalation_id: str) -> EscalationRow:
    """One escalation; NotFoundError if there is none."""
    row = (
        db.reader()
        .execute(f"SELECT {_ESC_COLUMNS} FROM escalations WHERE id = ?", (escalation_id,))
        .fetchone()
    )
    if row is None:
        raise NotFoundError(f"no escalation with id '{escalation_id}'")
    return _escalation(row)


class LazyAnswers(Mapping[str, Any]):
    """A run's answers, read from the database only if a step asks (most never escalate)."""

    def __init__(self, db: Database, run_id: str) -> None:
        self._db = db
        self._run_id = run_id
        self._answers: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._answers is None:
            self._answers = answers_for(self._db, self._run_id)
        return self._answers

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


def answers_for(db: Database, run_id: str) -> dict[str, Any]:
    """Answers given so far in a run, by escalation id."""
    rows = db.reader().execute(
        "SELECT id, answer FROM escalations WHERE run_id = ? AND state != 'open'", (run_id,)
    )
    return {i: loads(a) for i, a in rows}
