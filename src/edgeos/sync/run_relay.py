"""Runs handed over through the fleet: send a sealed run to another device of the fleet,
and take over the runs other devices sealed for this one.

The fleet checks who sends and to whom, and nudges the destination when an envelope
arrives, which wakes its long poll; the destination fetches after a sync in which its
revision moved and checks everything on arrival (:func:`edgeos.agents.migration.accept`),
against the fleet's revocations fetched just before and kept for when the node is
offline or a run arrives as a file. An envelope refused for good is acknowledged,
so that the fleet drops it; one whose agent is not installed yet (a rollout moves the
revision again), or that met a passing fault, stays at the fleet until it is taken or
expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import httpx
from pydantic import ValidationError

from edgeos.agents.migration import Accepted, Trust, accept
from edgeos.errors import ConfigError, EdgeOSError, NotFoundError
from edgeos.files import write_atomic
from edgeos.protocol.fleet import API
from edgeos.protocol.migration import Envelope, Revocations, RunEnvelopes
from edgeos.state import Database
from edgeos.sync.client import (
    async_fleet_client,
    fleet_error,
    parse_answer,
    transport_error,
)
from edgeos.sync.identity import FleetPaths, load_identity

log = logging.getLogger("edgeos.sync.runs")

PATH = f"{API}/runs/envelopes"
REVOCATIONS = f"{API}/revocations"


def trust(data_dir: Path, device_id: str) -> Trust:
    """What this device trusts: the fleet's CA, less the certificates the fleet revoked
    (as last fetched); ConfigError when the kept list cannot be read."""
    paths = FleetPaths.of(data_dir)
    ca = paths.ca.read_text()
    try:
        kept = paths.revoked.read_bytes()
    except FileNotFoundError:
        return Trust(device_id, ca)
    except OSError as exc:
        raise ConfigError(f"cannot read {paths.revoked}: {exc.strerror or exc}") from exc
    try:
        revoked = Revocations.model_validate_json(kept)
    except ValidationError as exc:
        raise ConfigError(
            f"{paths.revoked} is damaged ({exc.errors()[0]['msg']}): delete it, and the node "
            "fetches it again at its next sync"
        ) from exc
    return Trust(device_id, ca, frozenset(revoked.serials) | frozenset(revoked.devices))


async def fetch_revocations(client: httpx.AsyncClient, url: str, data_dir: Path) -> Revocations:
    """The fleet's revocations, kept in the data directory for every later check."""
    try:
        response = await client.get(REVOCATIONS)
    except httpx.HTTPError as exc:
        raise transport_error(exc, url, "the revocations") from exc
    found = parse_answer(response, Revocations, "the revocations")
    await asyncio.to_thread(
        write_atomic, FleetPaths.of(data_dir).revoked, found.model_dump_json().encode()
    )
    return found


async def send(client: httpx.AsyncClient, url: str, envelope: Envelope) -> None:
    """Hand a sealed run to the fleet for its destination."""
    what = f"run envelope {envelope.statement.envelope_id}"
    try:
        response = await client.post(
            PATH, content=envelope.to_bytes(), headers={"content-type": "application/json"}
        )
    except httpx.HTTPError as exc:
        raise transport_error(exc, url, what) from exc
    if not response.is_success:
        raise fleet_error(response, what)


async def receive(
    client: httpx.AsyncClient, url: str, db: Database, trust: Trust
) -> list[Accepted]:
    """Take over the runs waiting at the fleet for this device; returns those accepted."""
    try:
        response = await client.get(PATH)
    except httpx.HTTPError as exc:
        raise transport_error(exc, url, "the run envelopes") from exc
    waiting = parse_answer(response, RunEnvelopes, "the run envelopes")
    accepted: list[Accepted] = []
    for envelope in waiting.envelopes:
        envelope_id = envelope.statement.envelope_id
        try:
            accepted.append(await asyncio.to_thread(accept, db, envelope, trust=trust))
            log.info("took over run %s from device %s", accepted[-1].run_id, accepted[-1].source)
        except EdgeOSError as exc:
            if exc.retryable or isinstance(exc, NotFoundError):
                log.warning("run envelope %s waits at the fleet: %s", envelope_id, exc)
                continue
            log.warning("run envelope %s refused: %s", envelope_id, exc)
        try:
            done = await client.delete(f"{PATH}/{envelope_id}")
        except httpx.HTTPError as exc:
            raise transport_error(exc, url, f"run envelope {envelope_id}") from exc
        if not done.is_success and done.status_code != 404:
            raise fleet_error(done, f"run envelope {envelope_id}")
    return accepted


class RunInbox:
    """Fetches the runs sealed for this device after a sync in which the fleet's revision
    moved (and after the first sync of a life), until one fetch succeeds."""

    def __init__(self, db: Database, data_dir: Path) -> None:
        self.db, self.data_dir = db, Path(data_dir)
        self.stale = True
        self._failures = 0

    async def after_sync(
        self, client: httpx.AsyncClient, url: str, device_id: str, *, moved: bool
    ) -> list[Accepted]:
        """Take over what waits, if the revision moved or an earlier fetch failed."""
        self.stale = self.stale or moved
        if not self.stale:
            return []
        try:
            with contextlib.suppress(NotFoundError):  # a fleet older than revocations
                await fetch_revocations(client, url, self.data_dir)
            accepted = await receive(client, url, self.db, trust(self.data_dir, device_id))
        except EdgeOSError as exc:
            # Said once per streak: a fleet that lacks the route would fill the log.
            self._failures += 1
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            log.log(level, "runs sealed for this device not fetched, trying again: %s", exc)
            return []
        self.stale, self._failures = False, 0
        return accepted


def device_client(data_dir: Path, *, timeout: float = 30.0) -> tuple[httpx.AsyncClient, str, Trust]:
    """An mTLS client of the fleet this node enrolled in, the fleet's URL, and what this
    device trusts."""
    identity = load_identity(data_dir)
    if identity is None:
        raise ConfigError(f"{data_dir} is not enrolled in a fleet: runs are relayed by a fleet")
    paths = FleetPaths.of(data_dir)
    ca = paths.ca.read_text()
    client = async_fleet_client(identity.url, ca, cert=paths.cert, key=paths.key, timeout=timeout)
    return client, identity.url, trust(data_dir, identity.device_id)


async def send_from(data_dir: Path, envelope: Envelope) -> None:
    """:func:`send` with a client of its own (the command line)."""
    client, url, _ = device_client(data_dir)
    async with client:
        await send(client, url, envelope)


async def receive_at(db: Database, data_dir: Path) -> list[Accepted]:
    """:func:`receive` with a client of its own (the command line)."""
    client, url, trust = device_client(data_dir)
    async with client:
        return await receive(client, url, db, trust)
