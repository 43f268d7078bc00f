"""Sealing a run on the node it is on, so that another node can continue it.

One transaction takes the run out of this node: a ``migrated_out`` record, the run's row
set to ``migrated`` (the executor resumes only pending and running runs, and the node
database refuses any later write to the run's journal or row, see migration
``0016_run_migration``), its undelivered effects handed over (the delivery worker only
picks pending ones) and its context moved into the envelope. What is sealed is what was
committed, so a run is always sealed at a step boundary: a step in flight when it is
sealed cannot commit any more, and runs again from its start on the destination, as
after a crash, with nothing it decided lost or done twice.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from edgeos.agents import store
from edgeos.agents.bundle import bundle_digest
from edgeos.agents.migration.envelope import (
    DEFERRED_COLUMNS,
    ESCALATION_COLUMNS,
    Signer,
    part_digests,
    run_hashes,
    sha256,
    sign,
)
from edgeos.agents.store import MIGRATED
from edgeos.errors import ConflictError, NotFoundError
from edgeos.memory.context import purge as purge_run_context
from edgeos.protocol.migration import (
    FORMAT,
    AgentRef,
    Context,
    Effect,
    Envelope,
    Record,
    RunState,
    Statement,
    Turn,
)
from edgeos.state import Database, journal, outbox

#: States a run may be sealed in: between steps, or parked by a paused agent.
SEALABLE = ("pending", "running", "paused")
#: How long an envelope may wait to be accepted, by default.
DEFAULT_TTL = 3600.0


def seal(
    db: Database,
    run_id: str,
    *,
    signer: Signer,
    destination: str,
    ttl: float = DEFAULT_TTL,
    now: float | None = None,
) -> Envelope:
    """Take a run out of this node into an envelope for device ``destination``.

    ConflictError when the run is finished, already migrated, or waiting for a person or
    an offline venue (answer or settle it first); NotFoundError when there is no such
    run or its agent is not installed. Nothing changes when it is refused.
    """
    if ttl <= 0:
        raise ConflictError(f"an envelope's time to live must be positive, not {ttl:g} s")
    if destination == signer.device_id:
        raise ConflictError(f"run {run_id}: the destination is this device ({destination})")
    at = time.time() if now is None else now
    run = store.run(db, run_id)
    installed = store.agent(db, run.agent)
    agent = AgentRef(
        name=installed.name,
        version=installed.version,
        digest=bundle_digest(Path(installed.bundle_dir)),
    )
    envelope_id = str(uuid.uuid4())
    with db.transaction() as conn:
        state = _sealable_state(conn, run_id)
        row = conn.execute(
            "SELECT trigger, input, next_step, step_count, carry, seed, created_at, cost "
            "FROM runs WHERE id = ?",
            (run_id,),
        ).fetchone()
        trigger, input_, next_step, step_count, carry, seed, created_at, cost = row
        if next_step is None:
            raise ConflictError(f"run {run_id} has no next step to continue with ({state})")
        handed = outbox.hand_over(conn, run_id)
        context = _context(conn, run_id)
        purge_run_context(conn, run_id)  # it moves with the run
        journal.append(
            conn, run_id, "migrated_out",
            {"envelope": envelope_id, "to": destination, "expires_at": at + ttl,
             "effects": [e.key for e in handed]},
            at=at,
        )  # fmt: skip
        conn.execute(
            "UPDATE runs SET state = ?, updated_at = ? WHERE id = ?", (MIGRATED, at, run_id)
        )
        records = _records(conn, run_id)
        run_state = RunState(
            trigger=trigger, input=store.loads(input_), next_step=next_step,
            step_count=step_count, carry=store.loads(carry), seed=seed,
            created_at=created_at, cost=cost,
        )  # fmt: skip
        effects = [
            Effect(key=e.key, connector=e.connector, operation=e.operation,
                   payload=e.payload, attempts=e.attempts)
            for e in handed
        ]  # fmt: skip
        statement = Statement(
            format=FORMAT, envelope_id=envelope_id, run_id=run_id, agent=agent,
            source=signer.device_id, destination=destination, created_at=at,
            expires_at=at + ttl, records=len(records), head=records[-1].run_hash,
            digests=part_digests(run_state, context, effects),
        )  # fmt: skip
        envelope = Envelope(
            statement=statement, signature=sign(statement, signer.key),
            certificate=signer.certificate_pem, run=run_state, context=context,
            records=records, effects=effects,
        )  # fmt: skip
        # Kept until the run is back: if no node accepts it in time, the run is taken
        # back from it (edgeos.agents.migration.reclaim).
        conn.execute(
            "INSERT INTO run_envelopes (id, run_id, direction, peer, digest, at, body) "
            "VALUES (?, ?, 'out', ?, ?, ?, ?)",
            (envelope_id, run_id, destination, sha256(statement.model_dump(mode="json")), at,
             envelope.to_bytes()),
        )  # fmt: skip
    return envelope


def _sealable_state(conn: sqlite3.Connection, run_id: str) -> str:
    row = conn.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no run with id '{run_id}'")
    state = str(row[0])
    if state in SEALABLE:
        return state
    if state == MIGRATED:
        raise ConflictError(f"run {run_id} has already migrated to another node")
    if state == "waiting_human":
        raise ConflictError(
            f"run {run_id} waits for an answer (edgeos approvals list): answer it, then move it"
        )
    if state == "waiting_venue":
        raise ConflictError(
            f"run {run_id} waits for an offline venue: move it once its call is settled"
        )
    raise ConflictError(f"run {run_id} is {state}: only an unfinished run can move")


def _rows(conn: sqlite3.Connection, table: str, columns: tuple[str, ...], run_id: str) -> Any:
    return [
        list(r)
        for r in conn.execute(
            f"SELECT {', '.join(columns)} FROM {table} WHERE run_id = ? ORDER BY rowid", (run_id,)
        )
    ]


def _context(conn: sqlite3.Connection, run_id: str) -> Context:
    values = {
        k: store.loads(v)
        for k, v in conn.execute(
            "SELECT key, value FROM run_context WHERE run_id = ? ORDER BY key", (run_id,)
        )
    }
    turns = [
        Turn(n=n, role=role, text=text, at=at)
        for n, role, text, at in conn.execute(
            "SELECT n, role, text, at FROM run_turns WHERE run_id = ? ORDER BY n", (run_id,)
        )
    ]
    return Context(
        values=values,
        turns=turns,
        escalations=_rows(conn, "escalations", ESCALATION_COLUMNS, run_id),
        deferred=_rows(conn, "deferred_tasks", DEFERRED_COLUMNS, run_id),
    )


def _records(conn: sqlite3.Connection, run_id: str) -> list[Record]:
    rows = conn.execute(
        "SELECT kind, step, at, payload FROM journal WHERE run_id = ? ORDER BY seq", (run_id,)
    ).fetchall()
    parsed = [
        (kind, step, at, journal.load_payload(payload, conn)) for kind, step, at, payload in rows
    ]
    hashes = run_hashes(run_id, parsed)
    return [
        Record(kind=kind, step=step, at=at, payload=payload, run_hash=h)
        for (kind, step, at, payload), h in zip(parsed, hashes, strict=True)
    ]
