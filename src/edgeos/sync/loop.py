"""The sync loop: enroll if needed, then long-poll the fleet, apply what changed, report.

Each sync reports what the node runs (and refused), its health and, the first time and
when it changes, its inventory; asks for a certificate renewal once a third of the
certificate's validity is left; and waits at the fleet (``wait_s``) until the desired
state moves, so a deployment reaches the node within a second or two. What changed is
applied in a worker thread, and the result is reported by the next sync at once. The
link's states are in :mod:`edgeos.sync.link`. A fleet problem never stops the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from edgeos.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    EdgeOSError,
    VerificationError,
)
from edgeos.protocol.fleet import API, DesiredArtifact, Inventory, SyncRequest, SyncResponse
from edgeos.retry import backoff_delay
from edgeos.state import Database
from edgeos.sync import state
from edgeos.sync.client import async_fleet_client, parse_answer, transport_error
from edgeos.sync.enroll import enroll, install_certificate, renewal_csr, token_due
from edgeos.sync.grants import GrantSync
from edgeos.sync.identity import FleetPaths, Identity, forget_join_request, load_identity
from edgeos.sync.kinds import Interrupted
from edgeos.sync.link import REFUSED, Link
from edgeos.sync.run_relay import RunInbox
from edgeos.sync.source import apply_from_fleet, in_daemon_thread

if TYPE_CHECKING:
    from edgeos.sync.apply import Applier, Outcome
    from edgeos.sync.approvals import EscalationRelay
    from edgeos.sync.health import HealthProbe

log = logging.getLogger("edgeos.sync")


class SyncLoop:
    """One node's conversation with its fleet, as an asyncio task."""

    def __init__(
        self,
        *,
        data_dir: Path,
        db: Database,
        applier: Applier,
        probe: HealthProbe,
        inventory: Callable[[], Inventory],
        fleet_url: str | None = None,
        join_token: str | None = None,
        wait_s: float = 25.0,
        retry_cap_s: float = 60.0,
        refused_retry_s: float = 600.0,
        timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        relay: EscalationRelay | None = None,
    ) -> None:
        self.data_dir, self.db, self.applier, self.probe = Path(data_dir), db, applier, probe
        self.inventory, self.clock, self.relay = inventory, clock, relay
        self.fleet_url = fleet_url.rstrip("/") if fleet_url else None
        self._token = join_token
        self.wait_s, self.retry_cap_s = wait_s, retry_cap_s
        self.refused_retry_s, self.timeout_s = refused_retry_s, timeout_s
        self.paths = FleetPaths.of(self.data_dir)
        self.identity: Identity | None = None
        with contextlib.suppress(EdgeOSError):  # unreadable: enroll again, with a token
            self.identity = load_identity(self.data_dir)
        self.link = Link.at_start(self.identity is not None, state.get_value(db, "link"), clock())
        self._synced, self.revision, self.interval = False, 0, wait_s  # this life's
        self._desired: list[DesiredArtifact] | None = None
        self._sent_inventory: Inventory | None = None
        self._problems: list[str] = []
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy: asyncio.Future[Any] | None = None
        #: Secrets the fleet grants this device, fetched when its revision moves.
        self.grants = GrantSync(db, self.data_dir)
        #: Runs other devices sealed for this one, fetched when the revision moves.
        self.runs = RunInbox(db, self.data_dir)

    async def start(self) -> None:
        """Start syncing in the background."""
        self._task = asyncio.get_running_loop().create_task(self.run(), name="edgeos-sync")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop: a health check under way gives up (its switch is undone). Safe to repeat."""
        self.applier.stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._busy is not None and not self._busy.done():
            await asyncio.wait({self._busy}, timeout=grace)
        await self._close_client()
        await self._persist()

    def online_client(self) -> tuple[httpx.AsyncClient, str] | None:
        """The device's mTLS client and id while the fleet link is online, else None: the
        telemetry uplink sends over the same connection."""
        identity = self.identity
        if identity is None or self.link.state != "online":
            return None
        return self._http(identity), identity.device_id

    def status(self) -> dict[str, Any]:
        """The link as ``edgeos node status`` shows it."""
        ident = self.identity
        return {
            "url": ident.url if ident else self.fleet_url,
            "device_id": ident.device_id if ident else None,
            "group": ident.group if ident else None,
            "certificate_expires": ident.certificate_not_after if ident else None,
            "revision": self.revision,
            **self.link.to_json(),
        }

    async def run(self) -> None:
        """Sync until cancelled; every failure is said and tried again later."""
        failures = 0
        while True:
            try:
                delay = await self._step()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a fleet problem must never stop the node
                failures += 1
                delay = self._offline(exc, failures)
            await self._persist()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _step(self) -> float:
        """One enrollment or one sync; returns how long to wait before the next step."""
        token = self._enrollment_token()
        if token is not None:
            return await self._enroll(token)
        identity = self.identity
        if identity is None:
            self._set_link("not enrolled", "no join token: start the node with --join-token "
                           "(or EDGEOS_JOIN_TOKEN) and --fleet URL")  # fmt: skip
            return self.refused_retry_s
        if identity.expired(self.clock()):
            when = datetime.fromtimestamp(identity.certificate_not_after, UTC).isoformat()
            self._set_link("certificate expired", f"the device certificate expired at {when}; "
                           "running the last committed state; a new join token enrolls it again")  # fmt: skip
            return self.refused_retry_s
        try:
            return await self._sync(identity)
        except AuthenticationError as exc:
            await self._close_client()
            self._set_link("revoked", f"{exc}; running the last committed state; a new join "
                           "token enrolls it again")  # fmt: skip
            return 0.0 if self._enrollment_token() else self.refused_retry_s

    def _enrollment_token(self) -> str | None:
        """The join token, when it should be used now."""
        refused = self.link.state in REFUSED
        return self._token if token_due(self._token, self.paths, self.identity, refused) else None

    async def _enroll(self, token: str) -> float:
        url = self.fleet_url or (self.identity.url if self.identity else None)
        before = self.link.state
        if url is None:
            self._token = None
            self._set_link(before, "a join token but no fleet URL: give --fleet URL")
            return self.refused_retry_s
        self._set_link("enrolling")
        work = partial(enroll, self.data_dir, url, token, self.inventory(), timeout=self.timeout_s)
        try:
            identity = await asyncio.shield(self._background(work, "edgeos-enroll"))
        except (AuthenticationError, VerificationError, ConflictError, ConfigError) as exc:
            self._token = None  # refused: asking again with it would only be refused again
            self._set_link(
                before if before in REFUSED else "not enrolled", f"enrollment refused: {exc}"
            )
            return self.refused_retry_s
        self.identity, self._token, self._sent_inventory = identity, None, None
        self._synced = False
        forget_join_request(self.data_dir)  # spent
        if await asyncio.to_thread(state.health_since, self.db) == 0.0:
            # Health describes the node's work since it joined, until the first switch.
            await asyncio.to_thread(state.restart_health, self.db)
        await self._close_client()
        self._set_link("online")
        return 0.0

    async def _sync(self, identity: Identity) -> float:
        started = self.clock()
        # The first sync of a life answers at once: the fleet hears of the node, and the
        # node of its desired state, without waiting for a change.
        first = not self._synced
        wait = 0.0 if first else max(0.0, min(self.wait_s, self.interval, 60.0))
        report = await asyncio.to_thread(self._report, identity, wait)
        client, url = self._http(identity), self._url(identity)
        try:
            response = await client.post(
                f"{API}/sync", content=report.model_dump_json(),
                headers={"content-type": "application/json"}, timeout=wait + self.timeout_s,
            )  # fmt: skip
        except httpx.HTTPError as exc:
            raise transport_error(exc, url, "the sync") from exc
        answer = parse_answer(response, SyncResponse, "the sync")
        if report.inventory is not None:
            self._sent_inventory = report.inventory
        self.interval = answer.sync_interval_s
        self._set_link("online")
        self.link.last_sync, self._synced = self.clock(), True
        changed = answer.revision != report.revision
        if self.relay is not None:  # escalations out, operators' answers in
            await self.relay.exchange(client, identity.device_id, url)
        if answer.certificate_pem is not None:
            pem = answer.certificate_pem
            self.identity = await asyncio.to_thread(
                install_certificate, self.data_dir, identity, pem
            )
            await self._close_client()
            log.info("device certificate renewed until %s", self.identity.certificate_not_after)
            changed = True
        moved = first or answer.revision != report.revision
        await self.grants.after_sync(self._http(identity), url, identity.device_id, moved=moved)
        await self.runs.after_sync(self._http(identity), url, identity.device_id, moved=moved)
        todo = await asyncio.to_thread(self.applier.plan, answer.desired)
        if todo or answer.desired != self._desired:
            if not await self._apply(answer.desired, identity):
                return 0.0
            changed = True
        self.revision = answer.revision
        if changed or first or self.clock() - started >= wait / 2:
            return 0.0
        # The fleet answered at once with nothing new: it did not hold the poll. Ask
        # again at the sync interval, not in a tight loop.
        return max(0.0, min(self.interval, self.wait_s) - (self.clock() - started))

    def _report(self, identity: Identity, wait: float) -> SyncRequest:
        inventory = self.inventory()
        due = identity.renewal_due(self.clock())
        return SyncRequest(
            device_id=identity.device_id,
            revision=self.revision,
            actual=self.applier.actual(),
            health=self.probe.collect(self._problems),
            inventory=None if inventory == self._sent_inventory else inventory,
            csr_pem=renewal_csr(self.data_dir, identity) if due else None,
            wait_s=wait,
        )

    async def _apply(self, desired: list[DesiredArtifact], identity: Identity) -> bool:
        """Apply in a worker thread; False when it was interrupted or failed unexpectedly."""
        url, timeout = self._url(identity), self.timeout_s
        work = partial(apply_from_fleet, self.applier, self.paths, url, desired, timeout)
        try:
            outcomes: list[Outcome] = await asyncio.shield(self._background(work, "edgeos-apply"))
        except Interrupted:
            return False
        except Exception as exc:  # a fault of the node's, not the fleet's: report, retry later
            log.exception("applying the desired state failed")
            self._problems = [f"applying the desired state failed: {exc}"]
            return False
        self._problems = [o.problem for o in outcomes if o.state == "pending"]
        self._desired = desired
        return True

    def _background(self, fn: Callable[[], Any], name: str) -> asyncio.Future[Any]:
        self._busy = future = in_daemon_thread(fn, name)
        # Retrieved here, so a result nobody awaits (after a stop) is not reported as lost.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def _http(self, identity: Identity) -> httpx.AsyncClient:
        if self._client is None:
            p = self.paths
            ca, url = p.ca.read_text(), self._url(identity)
            self._client = async_fleet_client(
                url, ca, cert=p.cert, key=p.key, timeout=self.timeout_s
            )
        return self._client

    def _url(self, identity: Identity) -> str:
        # The fleet URL given now wins over the one enrolled with: the same fleet (its CA
        # checks that) may have moved.
        return self.fleet_url or identity.url

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _set_link(self, new: str, error: str | None = None) -> None:
        self.link.move(new, error, self.clock())  # logged when the state changes

    def _offline(self, exc: Exception, failures: int) -> float:
        if not isinstance(exc, EdgeOSError):
            log.error("fleet sync failed unexpectedly", exc_info=exc)
        elif failures == 1:
            log.warning("fleet unreachable, retrying with backoff: %s", exc)
        self._set_link("offline", str(exc) if isinstance(exc, EdgeOSError) else repr(exc))
        return backoff_delay(failures, base=1.0, cap=self.retry_cap_s)

    async def _persist(self) -> None:
        """Keep the link for ``edgeos node status`` of a stopped node (best effort)."""
        try:
            await asyncio.to_thread(state.set_value, self.db, "link", self.status())
        except EdgeOSError as exc:
            log.debug("fleet link not saved: %s", exc)
