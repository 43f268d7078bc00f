"""An envelope's signature and its per-run chain (the format: :mod:`edgeos.protocol.migration`).

An envelope holds everything a run needs to go on elsewhere: its row (next step, carry,
seed, cost), its context (``ctx.context`` values and turns, answered escalations, settled
deferred calls), the effects it decided that are not delivered yet (with their keys) and
every journal record it has. The records carry a chain of their own: the node-wide chain
cannot travel, so each record's run hash is ``H(previous run hash, record)``, the same
function as the node chain's, continued on every node the run visits.

What the source device signs is the :class:`Statement`: who, for whom, until when, the
head of that chain and a digest of every other part. The signature is ECDSA P-256 with
the key whose certificate the fleet CA issued; the certificate travels along.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from edgeos.errors import VerificationError
from edgeos.protocol.migration import Context, Digests, Effect, RunState, Statement
from edgeos.state.journal import GENESIS, canonical, record_hash

#: The columns of the rows that travel with a run, in the order an envelope lists them.
ESCALATION_COLUMNS = (
    "id", "run_id", "step", "question", "options", "proposal", "default_choice", "deadline",
    "state", "answer", "note", "answered_by", "answered_at", "override",
)  # fmt: skip
DEFERRED_COLUMNS = (
    "id", "run_id", "agent", "step", "model", "awaiting", "reason", "default_outputs", "state",
    "deadline", "deferred_at", "settled_at",
)  # fmt: skip


@dataclass(frozen=True)
class Signer:
    """The device that seals: its id, its private key and the certificate the CA issued."""

    device_id: str
    key: ec.EllipticCurvePrivateKey
    certificate_pem: str


def sha256(value: Any) -> str:
    """Full sha256 (hex) of a JSON value's canonical encoding."""
    return hashlib.sha256(canonical(value)).hexdigest()


def part_digests(run: RunState, context: Context, effects: Sequence[Effect]) -> Digests:
    """The digests a statement holds of the envelope's parts."""
    return Digests(
        run=sha256(run.model_dump(mode="json")),
        context=sha256(context.model_dump(mode="json")),
        effects=sha256([e.model_dump(mode="json") for e in effects]),
    )


def run_hash(prev: str, run_id: str, kind: str, step: str | None, at: float, payload: Any) -> str:
    """One record's link in its run's chain."""
    return record_hash(prev, run_id, kind, step, at, canonical(payload))


def run_hashes(
    run_id: str, records: Iterable[tuple[str, str | None, float, Any]], prev: str = GENESIS
) -> list[str]:
    """The run hash of each ``(kind, step, at, payload)``, in order, from ``prev``."""
    hashes_: list[str] = []
    for kind, step, at, payload in records:
        prev = run_hash(prev, run_id, kind, step, at, payload)
        hashes_.append(prev)
    return hashes_


def sign(statement: Statement, key: ec.EllipticCurvePrivateKey) -> str:
    """The statement's signature (base64 DER ECDSA-SHA256)."""
    der = key.sign(canonical(statement.model_dump(mode="json")), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode()


def check_signature(
    statement: Statement, signature: str, public_key: ec.EllipticCurvePublicKey
) -> None:
    """VerificationError unless ``signature`` is the statement's, made by ``public_key``'s
    private key."""
    try:
        der = base64.b64decode(signature, validate=True)
        public_key.verify(
            der, canonical(statement.model_dump(mode="json")), ec.ECDSA(hashes.SHA256())
        )
    except (InvalidSignature, ValueError) as exc:
        raise VerificationError(
            f"envelope {statement.envelope_id}: the signature does not verify with the "
            f"certificate of device {statement.source!r}: forged, or changed after signing"
        ) from exc
