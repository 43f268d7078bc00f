"""``POST /api/v1/sync``: a device reports its state and learns what it should run.

The hot path of the fleet (every device, every interval), so it is one transaction of
four statements: check the certificate's serial and the device's status, record the
report, read the device's assignments, read its revision. The CA's signature check is
cached per certificate. A long poll waits outside any transaction, on a watcher that
reads the revisions a few times a second for every waiting device at once, so it also
sees changes made by other replicas.

A device's revision is the desired state's plus its own nudges (news for it alone: an
operator's answer, a run handed to it): a change to the desired state wakes every long
poll, a nudge only that device's, so an answer to one store does not send a thousand
devices syncing. Devices treat the revision as opaque: it only has to move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.errors import AuthenticationError, EdgeOSError, PermissionDeniedError
from edgeos.fleet import tables
from edgeos.fleet.auth import DeviceIdentity, authenticate_device, device_actor
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.db import (
    FleetDatabase,
    audit_refusal,
    current_revision,
    device_revision,
    nudge_count,
    nudged_since,
)
from edgeos.fleet.web import json_response, parse_body
from edgeos.protocol.fleet import API, DesiredArtifact, SyncRequest, SyncResponse
from edgeos.security.tls import peer_certificate

log = logging.getLogger("edgeos.fleet.sync")


class RevisionWatcher:
    """The desired state's revision and devices' nudges as last read, and a way to wait
    for one device's revision to move."""

    def __init__(self, db: FleetDatabase, interval_s: float) -> None:
        self.db = db
        self.interval_s = interval_s
        self.revision = -1
        #: The fleet's nudge count when last read; -1 before: the first read takes every
        #: device's nudges.
        self.nudge_seq = -1
        self.nudges: dict[str, int] = {}
        self.closing = False
        self._changed = asyncio.Event()

    def device_revision(self, device_id: str) -> int:
        """A device's revision as last read (never ahead of the database's)."""
        return self.revision + self.nudges.get(device_id, 0)

    def close(self) -> None:
        """Answer every waiting long poll now: the replica is shutting down, and a
        device would rather hear its current state than have the connection cut."""
        self.closing = True
        self._changed.set()

    def _read(self) -> tuple[int, int, dict[str, int]]:
        with self.db.read() as conn:
            revision, seq = current_revision(conn), nudge_count(conn)
            # After the count: a nudge committed in between is read again next time.
            moved = nudged_since(conn, self.nudge_seq) if seq != self.nudge_seq else {}
        return revision, seq, moved

    async def poll(self) -> None:
        """Read the revisions once; wake the waiters if any moved (each checks its own)."""
        revision, seq, moved = await run_in_threadpool(self._read)
        moved = {d: n for d, n in moved.items() if self.nudges.get(d) != n}
        self.nudge_seq = seq
        if revision != self.revision or moved:
            self.revision = revision
            self.nudges.update(moved)
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def run(self) -> None:
        """Poll until cancelled; a failed read is logged and tried again."""
        while True:
            try:
                await self.poll()
            except Exception:  # the database hiccuped: waiters just wait longer
                log.exception("reading the fleet revision failed")
            await asyncio.sleep(self.interval_s)

    async def wait_past(self, device_id: str, revision: int, timeout: float) -> bool:
        """Wait until the device's revision is above ``revision`` or ``timeout`` passes;
        True if it is."""
        deadline = time.monotonic() + timeout
        while self.device_revision(device_id) <= revision and not self.closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.device_revision(device_id) > revision


_A, _ART = tables.assignments, tables.artifacts
# The statements of every sync, built once: SQLAlchemy then computes each one's cache key
# once instead of on every request.
_DESIRED = (
    sa.select(_A.c.kind, _A.c.name, _A.c.version, _A.c.rollout_id, _ART.c.target)
    .join(
        _ART,
        sa.and_(_ART.c.kind == _A.c.kind, _ART.c.name == _A.c.name, _ART.c.version == _A.c.version),
    )
    .where(_A.c.device_id == sa.bindparam("device_id"))
    .order_by(_A.c.kind, _A.c.name)
)
_REPORTED = ("last_seen", "revision", "health", "actual")
_REPORT = (
    sa.update(tables.devices)
    .where(tables.devices.c.id == sa.bindparam("device_id"))
    .values({name: sa.bindparam(f"new_{name}") for name in _REPORTED})
)
_REPORT_INVENTORY = _REPORT.values(inventory=sa.bindparam("new_inventory"))


def desired_state(conn: Connection, device_id: str) -> list[DesiredArtifact]:
    """The device's assignments, each with the TUF target path of its version."""
    return [
        DesiredArtifact(kind=r.kind, name=r.name, version=r.version, target=r.target,
                        rollout_id=r.rollout_id)
        for r in conn.execute(_DESIRED, {"device_id": device_id})
    ]  # fmt: skip


def sync_once(ctx: FleetContext, pem: str | None, body: SyncRequest, what: str) -> SyncResponse:
    """Authenticate, record the report, renew if asked, and answer: one transaction."""
    now = time.time()
    identity: DeviceIdentity | None = None
    try:
        with ctx.db.begin() as conn:
            identity = authenticate_device(ctx, conn, pem, now=now)
            if body.device_id != identity.device_id:
                raise PermissionDeniedError(
                    f"device {identity.device_id} asked for the state of device {body.device_id}"
                )
            certificate = None
            if body.csr_pem is not None:
                certificate = _renew(ctx, conn, identity, body.csr_pem, now)
            params = {
                "device_id": identity.device_id,
                "new_last_seen": now,
                "new_revision": body.revision,
                "new_health": body.health.model_dump_json(),
                "new_actual": orjson.dumps([a.model_dump() for a in body.actual]).decode(),
            }
            if body.inventory is None:
                conn.execute(_REPORT, params)
            else:
                params["new_inventory"] = body.inventory.model_dump_json()
                conn.execute(_REPORT_INVENTORY, params)
            desired = desired_state(conn, identity.device_id)
            revision = device_revision(conn, identity.device_id)
    except EdgeOSError as exc:
        actor = identity.actor if identity is not None else device_actor(ctx, pem)
        audit_refusal(ctx.db, actor=actor, action="sync", target=what, detail=str(exc))
        raise
    return SyncResponse(
        revision=revision,
        desired=desired,
        certificate_pem=certificate,
        sync_interval_s=ctx.config.sync_interval_s,
    )


def _renew(
    ctx: FleetContext, conn: Connection, identity: DeviceIdentity, csr_pem: str, now: float
) -> str:
    # The CA refuses a CSR naming another device (VerificationError): nothing is stored.
    issued = ctx.ca.issue_device(
        csr_pem,
        device_id=identity.device_id,
        group=identity.group,
        validity=timedelta(seconds=ctx.config.cert_validity_s),
    )
    conn.execute(
        sa.insert(tables.certificates).values(
            serial=issued.serial, device_id=identity.device_id, not_after=issued.not_after,
            issued_at=now, revoked=False,
        )
    )  # fmt: skip
    return issued.pem


def _recheck(ctx: FleetContext, pem: str | None, device_id: str, what: str) -> SyncResponse:
    """After a long poll: the device must still be allowed, then its (new) desired state."""
    try:
        with ctx.db.read() as conn:
            authenticate_device(ctx, conn, pem, now=time.time())
            return SyncResponse(
                revision=device_revision(conn, device_id),
                desired=desired_state(conn, device_id),
                sync_interval_s=ctx.config.sync_interval_s,
            )
    except EdgeOSError as exc:
        audit_refusal(ctx.db, actor=f"device:{device_id}", action="sync", target=what,
                      detail=str(exc))  # fmt: skip
        raise


def sync_routes(watcher: RevisionWatcher) -> list[Route]:
    """The sync endpoint, long polls waiting on ``watcher``."""

    async def sync(request: Request) -> Response:
        ctx = fleet_context(request)
        pem = peer_certificate(request.scope)
        what = f"{request.method} {request.url.path}"
        if pem is None:
            # Who has no certificate hears 401, whatever the body.
            refusal = AuthenticationError("a device client certificate is required (mutual TLS)")
            await run_in_threadpool(
                audit_refusal, ctx.db, actor="anonymous", action="sync", target=what,
                detail=str(refusal),
            )  # fmt: skip
            raise refusal
        body = await parse_body(request, SyncRequest)
        answer = await run_in_threadpool(sync_once, ctx, pem, body, what)
        waits = body.wait_s > 0 and answer.certificate_pem is None
        if (
            waits
            and answer.revision == body.revision
            and await watcher.wait_past(body.device_id, body.revision, body.wait_s)
        ):
            answer = await run_in_threadpool(_recheck, ctx, pem, body.device_id, what)
        return json_response(answer)

    return [Route(f"{API}/sync", sync, methods=["POST"])]
