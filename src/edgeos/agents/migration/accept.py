"""Accepting a sealed run: every check first, then one transaction that imports it.

The checks, in order: the envelope parses (an error names the field); the certificate was
issued by the fleet CA this node trusts, is within its validity, names the device the
statement names as source and is not revoked; the signature over the statement holds;
the envelope is for this device and has not expired; each part matches its signed
digest and each record its run hash (an error names the first record that does not);
then, inside the import's transaction, the envelope was never seen here, the run is not
active here, and the agent is installed at the same version and bundle. Any refusal
changes nothing.

A run coming back to a node it has been on replaces its ``migrated`` row; the node's
earlier records of it must be exactly the envelope's first records, and only the
records it does not have yet are appended.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from edgeos.agents import store
from edgeos.agents.bundle import bundle_digest
from edgeos.agents.migration.envelope import (
    DEFERRED_COLUMNS,
    ESCALATION_COLUMNS,
    check_signature,
    part_digests,
    run_hash,
    sha256,
)
from edgeos.agents.migration.verify import check_arrival
from edgeos.agents.store import MIGRATED
from edgeos.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    VerificationError,
)
from edgeos.protocol.migration import Envelope
from edgeos.security import verify_device_certificate
from edgeos.state import Database, journal, outbox
from edgeos.state.journal import GENESIS

#: How far ahead of this node's clock an envelope's creation may be (clocks drift).
CLOCK_SKEW = 300.0
#: The largest envelope read: a run's journal, context and effects fit many times over.
MAX_ENVELOPE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Trust:
    """What the accepting node trusts: its own device id, the fleet CA's certificate, and
    the device ids or certificate serials it knows to be revoked."""

    device_id: str
    ca_pem: str
    revoked: Collection[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Accepted:
    """What an import did."""

    run_id: str
    envelope_id: str
    source: str
    records: int
    effects: int
    returned: bool


def parse(data: bytes | str, *, source: str = "the envelope") -> Envelope:
    """An envelope from its JSON; VerificationError naming the first wrong field."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise VerificationError(
            f"{source} is {len(data)} bytes, more than an envelope may hold "
            f"({MAX_ENVELOPE_BYTES} bytes)"
        )
    try:
        return Envelope.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise VerificationError(
            f"{source} is not a run envelope: field '{where}': {first['msg']}"
            + (f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else "")
        ) from None


def accept(db: Database, envelope: Envelope, *, trust: Trust, now: float | None = None) -> Accepted:
    """Check a sealed run and import it so this node's executor continues it."""
    at = time.time() if now is None else now
    statement = envelope.statement
    check_sender(envelope, trust, at)
    check_content(envelope, trust.ca_pem)
    with db.transaction() as conn:
        seen = conn.execute(
            "SELECT direction FROM run_envelopes WHERE id = ?", (statement.envelope_id,)
        ).fetchone()
        if seen is not None:
            raise ConflictError(
                f"envelope {statement.envelope_id} was already "
                f"{'accepted' if seen[0] == 'in' else 'sealed'} here: a replay is refused"
            )
        _check_agent(db, envelope)
        kept = kept_records(conn, envelope)
        import_run(conn, envelope, kept, at)
    return Accepted(
        statement.run_id, statement.envelope_id, statement.source,
        len(envelope.records) - kept + 1, len(envelope.effects), kept > 0,
    )  # fmt: skip


def check_sender(envelope: Envelope, trust: Trust, at: float) -> None:
    """The certificate chains to the trusted CA, is valid now, names the source and is not
    revoked; the signature holds; the envelope is for this device and still valid."""
    statement = envelope.statement
    cert = verify_device_certificate(envelope.certificate, trust.ca_pem, now=at)
    if cert.device_id != statement.source:
        raise VerificationError(
            f"envelope {statement.envelope_id} says it comes from device {statement.source!r} "
            f"but its certificate is device {cert.device_id!r}'s"
        )
    if cert.device_id in trust.revoked or cert.serial in trust.revoked:
        raise AuthenticationError(
            f"envelope {statement.envelope_id}: device {cert.device_id!r} (certificate "
            f"{cert.serial}) is revoked"
        )
    public_key = x509.load_pem_x509_certificate(envelope.certificate.encode()).public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):  # verified above: never
        raise VerificationError("the envelope's certificate does not hold an EC key")
    check_signature(statement, envelope.signature, public_key)
    if statement.destination != trust.device_id:
        raise PermissionDeniedError(
            f"envelope {statement.envelope_id} is sealed for device {statement.destination!r}, "
            f"not this one ({trust.device_id})"
        )
    if at > statement.expires_at:
        raise VerificationError(
            f"envelope {statement.envelope_id} expired {at - statement.expires_at:.0f} s ago: "
            "seal the run again on its source"
        )
    if statement.created_at > at + CLOCK_SKEW:
        raise VerificationError(
            f"envelope {statement.envelope_id} was made {statement.created_at - at:.0f} s in "
            "the future: check the clocks of both devices"
        )


def check_content(envelope: Envelope, ca_pem: str | None = None) -> None:
    """Each part matches its signed digest and every record its run hash, each earlier
    arrival sits on the head its sender signed (with a certificate of the fleet CA
    ``ca_pem``, when given); the last record is the source's ``migrated_out`` for this
    envelope and names the effects it holds."""
    statement = envelope.statement
    digests = part_digests(envelope.run, envelope.context, envelope.effects)
    for part in ("run", "context", "effects"):
        if getattr(digests, part) != getattr(statement.digests, part):
            raise VerificationError(
                f"envelope {statement.envelope_id}: its {part} part does not match the signed "
                "digest: it was changed after signing"
            )
    prev = GENESIS
    for index, record in enumerate(envelope.records):
        if record.kind == "migrated_in":  # an earlier hop: its sender's signed head holds
            problem = check_arrival(record.payload, statement.run_id, index, prev, ca_pem)
            if problem is not None:
                raise VerificationError(
                    f"envelope {statement.envelope_id}: record {index} (migrated_in): {problem}"
                )
        prev = run_hash(prev, statement.run_id, record.kind, record.step, record.at, record.payload)
        if prev != record.run_hash:
            raise VerificationError(
                f"envelope {statement.envelope_id}: record {index} ({record.kind}"
                f"{', step ' + record.step if record.step else ''}) does not match its run "
                "hash: the journal was changed"
            )
    if len(envelope.records) != statement.records or prev != statement.head:
        raise VerificationError(
            f"envelope {statement.envelope_id}: its records do not end at the signed head of "
            "the run's chain: records were added or removed"
        )
    last = envelope.records[-1]
    expected = {
        "envelope": statement.envelope_id,
        "to": statement.destination,
        "effects": [e.key for e in envelope.effects],
    }
    if last.kind != "migrated_out" or any(last.payload.get(k) != v for k, v in expected.items()):
        raise VerificationError(
            f"envelope {statement.envelope_id}: its last record is not the source's "
            "migrated_out record for this envelope and its effects"
        )
    for effect in envelope.effects:
        if not effect.key.startswith(f"{statement.run_id}:"):
            raise VerificationError(
                f"envelope {statement.envelope_id}: effect {effect.key!r} is not one of run "
                f"{statement.run_id}'s"
            )
    for name, rows, width in (
        ("escalations", envelope.context.escalations, len(ESCALATION_COLUMNS)),
        ("deferred", envelope.context.deferred, len(DEFERRED_COLUMNS)),
    ):
        for index, row in enumerate(rows):
            # Their ids are the run's too (run:step:n): no row of another run is touched.
            if (
                len(row) != width
                or row[1] != statement.run_id
                or not str(row[0]).startswith(f"{statement.run_id}:")
            ):
                raise VerificationError(
                    f"envelope {statement.envelope_id}: context.{name}.{index} is not a row "
                    f"of run {statement.run_id}"
                )


def _check_agent(db: Database, envelope: Envelope) -> None:
    wanted = envelope.statement.agent
    try:
        installed = store.agent(db, wanted.name)
    except NotFoundError:
        raise NotFoundError(
            f"run {envelope.statement.run_id} needs agent {wanted.name} {wanted.version}, "
            "which is not installed here: install it, then accept the envelope again"
        ) from None
    if (
        installed.version != wanted.version
        or bundle_digest(Path(installed.bundle_dir)) != wanted.digest
    ):
        raise ConflictError(
            f"run {envelope.statement.run_id} needs agent {wanted.name} {wanted.version} "
            f"(bundle {wanted.digest[:12]}); this node has {installed.version} with another "
            "bundle: install the same version, then accept the envelope again"
        )


def kept_records(conn: sqlite3.Connection, envelope: Envelope) -> int:
    """How many of the envelope's records this node has already (a run coming back);
    ConflictError when the run is active here or its records here differ."""
    run_id = envelope.statement.run_id
    row = conn.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        if conn.execute("SELECT 1 FROM journal WHERE run_id = ? LIMIT 1", (run_id,)).fetchone():
            raise ConflictError(f"run {run_id} has journal records here but no run")
        return 0
    if row[0] != MIGRATED:
        raise ConflictError(f"run {run_id} is already here ({row[0]}): refused")
    local = conn.execute(
        "SELECT kind, step, at, payload FROM journal WHERE run_id = ? ORDER BY seq", (run_id,)
    ).fetchall()
    prev = GENESIS
    for index, (kind, step, at, payload) in enumerate(local):
        prev = run_hash(prev, run_id, kind, step, at, journal.load_payload(payload, conn))
        if index >= len(envelope.records) or envelope.records[index].run_hash != prev:
            raise ConflictError(
                f"run {run_id} comes back with a history that differs from this node's at "
                f"record {index}: refused"
            )
    return len(local)


def import_run(conn: sqlite3.Connection, envelope: Envelope, kept: int, at: float) -> None:
    """Make the envelope's run resumable here (inside the caller's transaction): its row,
    the records after the first ``kept``, a ``migrated_in`` record, its context and its
    effects; ConflictError, to roll back, when an effect's key is here already."""
    statement, run = envelope.statement, envelope.run
    run_id = statement.run_id
    conn.execute("DELETE FROM runs WHERE id = ? AND state = ?", (run_id, MIGRATED))
    conn.execute(
        "INSERT INTO runs (id, agent, agent_version, trigger, input, state, next_step, "
        "step_count, carry, seed, created_at, updated_at, cost) "
        "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
        (run_id, statement.agent.name, statement.agent.version, run.trigger,
         store.dumps(run.input), run.next_step, run.step_count, store.dumps(run.carry),
         run.seed, run.created_at, at, run.cost),
    )  # fmt: skip
    for record in envelope.records[kept:]:
        journal.append(conn, run_id, record.kind, record.payload, step=record.step, at=record.at)
    journal.append(
        conn, run_id, "migrated_in",
        {"envelope": statement.envelope_id, "from": statement.source,
         "digest": sha256(envelope.model_dump(mode="json")),
         "statement": statement.model_dump(mode="json"), "signature": envelope.signature,
         "certificate": envelope.certificate},
        at=at,
    )  # fmt: skip
    context = envelope.context
    conn.executemany(
        "INSERT INTO run_context (run_id, key, value) VALUES (?, ?, ?)",
        [(run_id, k, store.dumps(v)) for k, v in context.values.items()],
    )
    conn.executemany(
        "INSERT INTO run_turns (run_id, n, role, text, at) VALUES (?, ?, ?, ?, ?)",
        [(run_id, t.n, t.role, t.text, t.at) for t in context.turns],
    )
    for table, columns, rows in (
        ("escalations", ESCALATION_COLUMNS, context.escalations),
        ("deferred_tasks", DEFERRED_COLUMNS, context.deferred),
    ):
        conn.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
            f"({', '.join('?' * len(columns))}) ON CONFLICT (id) DO NOTHING",
            rows,
        )
    for effect in envelope.effects:
        entry = outbox.OutboxEntry(
            effect.key, run_id, effect.connector, effect.operation, effect.payload,
            attempts=effect.attempts,
        )  # fmt: skip
        if not outbox.adopt(conn, entry, at=at):
            raise ConflictError(
                f"effect {effect.key} of run {run_id} is already here and not handed over: "
                "refused, so that it is not delivered twice"
            )
    # The run is here now: envelopes sealed here for it earlier are spent.
    conn.execute(
        "UPDATE run_envelopes SET body = NULL WHERE run_id = ? AND direction = 'out'", (run_id,)
    )
    conn.execute(
        "INSERT INTO run_envelopes (id, run_id, direction, peer, digest, at) "
        "VALUES (?, ?, 'in', ?, ?, ?)",
        (statement.envelope_id, run_id, statement.source,
         sha256(statement.model_dump(mode="json")), at),
    )  # fmt: skip
