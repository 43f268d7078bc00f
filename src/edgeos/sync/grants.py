"""The node's side of secret grants: fetch them when the fleet's revision moves, keep
them in the vault.

The fleet seals each grant to this device's key, bound to the device id and to every
field of the grant (:class:`edgeos.protocol.fleet.SealedSecret`). Each one is opened here
with ``fleet/device.key`` and stored in the vault, encrypted at rest like a local secret,
with its scopes, expiry and grant id. A grant the fleet no longer sends (revoked, expired,
replaced) is deleted from the vault. A grant that does not open (tampered with, or sealed
for another device) is refused and logged by id, never stored; the others still are.

Fetching failures never stop the sync: the grants stay as they were and are fetched
again at the next sync.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from edgeos.errors import EdgeOSError
from edgeos.protocol.fleet import API, SealedSecret, SecretGrants
from edgeos.state import Database
from edgeos.sync.client import parse_answer, transport_error
from edgeos.sync.identity import FleetPaths

log = logging.getLogger("edgeos.sync.grants")


@dataclass
class GrantsApplied:
    """What one pass changed: names stored, names deleted, grant ids refused."""

    stored: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def apply_grants(
    db: Database, data_dir: Path, grants: list[SealedSecret], device_id: str
) -> GrantsApplied:
    """Bring the vault's fleet grants to ``grants``: open and store new ones, delete gone ones."""
    # Here, not at the top: the vault and the key code load only on a node with grants.
    from edgeos.connectors.vault import Vault, load_key
    from edgeos.security.keys import load_private_key
    from edgeos.security.sealing import open_sealed

    done = GrantsApplied()
    device_key = load_private_key(FleetPaths.of(data_dir).key)
    # The vault key is wrapped by the device key from here on, if it was not yet.
    vault = Vault(db, load_key(data_dir))
    held = vault.grants()
    keep: set[str] = set()
    for grant in grants:
        if held.get(grant.grant_id) == grant.version:
            keep.add(grant.grant_id)
            continue
        try:
            box = base64.b64decode(grant.sealed, validate=True)
            value = open_sealed(device_key, box, grant.associated_data(device_id)).decode()
            vault.grant(
                grant.name, value, scopes=grant.scopes, expires_at=grant.expires_at,
                version=grant.version, grant_id=grant.grant_id,
            )  # fmt: skip
        except (EdgeOSError, binascii.Error, UnicodeDecodeError) as exc:
            log.warning("secret grant %s (%s) refused: %s", grant.grant_id, grant.name, exc)
            done.refused.append(grant.grant_id)
            continue
        keep.add(grant.grant_id)
        done.stored.append(grant.name)
    done.removed = vault.drop_grants(keep)
    if done.stored or done.removed:
        log.info(
            "secret grants from the fleet: %s stored, %s removed",
            ", ".join(done.stored) or "none", ", ".join(done.removed) or "none",
        )  # fmt: skip
    return done


class GrantSync:
    """Fetches the device's grants after a sync in which the fleet's revision moved (and
    after the first sync of a life), until one fetch succeeds."""

    def __init__(self, db: Database, data_dir: Path) -> None:
        self.db, self.data_dir = db, Path(data_dir)
        #: True until the grants of the current revision are in the vault.
        self.stale = True
        self._failures = 0

    async def after_sync(
        self, client: httpx.AsyncClient, url: str, device_id: str, *, moved: bool
    ) -> GrantsApplied | None:
        """Fetch and apply the grants if the revision moved or an earlier fetch failed;
        what changed, or None when nothing was fetched."""
        self.stale = self.stale or moved
        if not self.stale:
            return None
        try:
            try:
                response = await client.get(f"{API}/secrets")
            except httpx.HTTPError as exc:
                raise transport_error(exc, url, "the secret grants") from exc
            answer = parse_answer(response, SecretGrants, "the secret grants")
            done = await asyncio.to_thread(
                apply_grants, self.db, self.data_dir, answer.grants, device_id
            )
        except EdgeOSError as exc:
            # Said once per streak: a fleet that lacks the route would fill the log.
            self._failures += 1
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            log.log(level, "secret grants not updated, trying again at the next sync: %s", exc)
            return None
        self.stale, self._failures = False, 0
        return done
