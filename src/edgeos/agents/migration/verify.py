"""Verifying one run's journal across every node it ran on.

The run's records here are walked in order: each must still match the hash the node
chain gave it (its content was not changed here), and the run chain is recomputed from
the first record. Where the run arrived from another node (a ``migrated_in`` record),
the recomputed head must be the head the sending device signed, and that signature must
hold with the certificate kept in the record (and chain to the fleet CA, when given). So
a record changed anywhere along the way, here or on a node it passed, breaks the chain at
a named record.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from edgeos.agents.migration.envelope import check_signature, run_hash
from edgeos.errors import EdgeOSError
from edgeos.protocol.migration import Statement
from edgeos.security import verify_device_certificate
from edgeos.state import Database, journal
from edgeos.state.journal import GENESIS, canonical, record_hash


@dataclass(frozen=True)
class RunVerification:
    """The outcome of checking one run's chain."""

    run_id: str
    ok: bool
    checked: int
    #: Nodes the run arrived from, in order (source device ids of its ``migrated_in``).
    hops: tuple[str, ...]
    first_bad_seq: int | None = None
    reason: str | None = None
    head: str | None = None


def verify_run(db: Database, run_id: str, *, ca_pem: str | None = None) -> RunVerification:
    """Walk one run's records; report the first one that does not hold, by sequence."""
    records = journal.for_run(db, run_id)
    prev = GENESIS
    hops: list[str] = []
    for index, record in enumerate(records):
        body = canonical(record.payload)
        if record_hash(record.prev_hash, run_id, record.kind, record.step, record.at, body) != (
            record.hash
        ):
            return _bad(run_id, index, hops, record.seq, "its content does not match its hash")
        if record.kind == "migrated_in":
            problem = check_arrival(record.payload, run_id, index, prev, ca_pem)
            if problem is not None:
                return _bad(run_id, index, hops, record.seq, problem)
            hops.append(str(record.payload["from"]))
        prev = run_hash(prev, run_id, record.kind, record.step, record.at, record.payload)
    if not records:
        return RunVerification(run_id, False, 0, (), None, "the run has no records here")
    return RunVerification(run_id, True, len(records), tuple(hops), head=prev)


def check_arrival(
    payload: dict[str, object], run_id: str, index: int, prev: str, ca_pem: str | None
) -> str | None:
    """Why a ``migrated_in`` record (the ``index``-th of the run, after the run hash
    ``prev``) does not hold, or None."""
    try:
        statement = Statement.model_validate(payload.get("statement"))
        certificate = str(payload["certificate"])
        signature = str(payload["signature"])
        key = x509.load_pem_x509_certificate(certificate.encode()).public_key()
    except (ValidationError, KeyError, ValueError):
        return "its envelope statement or certificate cannot be read"
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return "its certificate does not hold an EC key"
    try:
        check_signature(statement, signature, key)
        if ca_pem is not None:
            # At the envelope's time: a certificate is short-lived, the record is not.
            verify_device_certificate(certificate, ca_pem, now=statement.created_at)
    except EdgeOSError as exc:
        return str(exc)
    if statement.run_id != run_id or statement.source != payload.get("from"):
        return "its envelope is for another run or from another device"
    if statement.records != index or statement.head != prev:
        return (
            f"the {index} record(s) before it do not end at the head device "
            f"{statement.source!r} signed: a record before it was changed, added or removed"
        )
    return None


def _bad(run_id: str, checked: int, hops: list[str], seq: int, reason: str) -> RunVerification:
    return RunVerification(run_id, False, checked + 1, tuple(hops), seq, reason)
