"""The fleet's part of a running node: recovery at open, the policy in force, the sync loop.

The node builds one :class:`FleetService` when a fleet is configured (a fleet URL, a join
token, or an identity from an earlier enrollment), and imports nothing of
:mod:`edgeos.sync` otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.settings import NodeSettings
from edgeos.state import Database
from edgeos.sync.apply import Applier
from edgeos.sync.approvals import EscalationRelay
from edgeos.sync.health import HealthProbe
from edgeos.sync.identity import FleetPaths, read_join_request
from edgeos.sync.inventory import collect_inventory
from edgeos.sync.loop import SyncLoop
from edgeos.sync.memory_target import MemoryReplicator
from edgeos.sync.policy import PolicyCache
from edgeos.sync.telemetry_uplink import TelemetryUplink, UplinkConfig, vault_secrets
from edgeos.telemetry import MetricsRegistry

if TYPE_CHECKING:
    from edgeos.manifests.agent import AgentManifest
    from edgeos.protocol.fleet import Inventory


class FleetService:
    """Everything a node needs to follow a fleet."""

    def __init__(
        self,
        settings: NodeSettings,
        db: Database,
        registry: ModelRegistry,
        *,
        host: ModelHost | None = None,
        metrics: MetricsRegistry | None = None,
        join_token: str | None = None,
    ) -> None:
        # httpx logs every request at INFO: a long poll every 25 s would fill the journal.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
        data_dir = Path(settings.data_dir)
        stored_url, stored_token = read_join_request(data_dir)
        self.policy = PolicyCache(FleetPaths.of(data_dir).policies)
        self.applier = Applier(db, registry, data_dir, host=host)
        providers = settings.execution_providers

        def inventory() -> Inventory:
            return collect_inventory(providers)

        self.loop = SyncLoop(
            data_dir=data_dir,
            db=db,
            applier=self.applier,
            probe=HealthProbe(db, metrics),
            inventory=inventory,
            fleet_url=settings.fleet_url or stored_url,
            join_token=join_token or stored_token,
            relay=EscalationRelay(db),
        )
        #: Long-term memory to the fleet's backup (and a replaced device's memory back).
        self.memory = MemoryReplicator.beside(self.loop)
        #: KPIs, alerts, traces and logs to the fleet, within the bandwidth cap.
        self.telemetry = TelemetryUplink(
            db, UplinkConfig.of(settings), metrics=metrics, secrets=vault_secrets(db, data_dir)
        )

    def recover(self) -> int:
        """Roll back switches a stop interrupted (before any agent runs); how many."""
        return len(self.applier.recover())

    def tighten(self, manifest: AgentManifest) -> AgentManifest:
        """An agent's manifest under the policies in force."""
        return self.policy.tighten(manifest)

    async def start(self) -> None:
        """Start syncing."""
        await self.loop.start()
        await self.memory.start()
        await self.telemetry.start(self.loop.online_client)

    async def stop(self) -> None:
        """Stop syncing (a health check under way is undone)."""
        await self.telemetry.stop()
        await self.memory.stop()
        await self.loop.stop()

    def status(self) -> dict[str, Any]:
        """The live link, for ``GET /api/status``."""
        return self.loop.status()
