"""The node process: open the database, build the host, serve the API, shut down cleanly.

Uvicorn turns SIGTERM and SIGINT into a graceful shutdown: it stops accepting
connections, lets in-flight requests finish, then runs the lifespan shutdown that
closes the model host and the database.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.agents.executor import Executor
from edgeos.agents.kpis import agent_metrics
from edgeos.connectors.base import Connector
from edgeos.connectors.delivery import DeliveryWorker
from edgeos.node import api_tls, tokens
from edgeos.node.access import ApiAccess, is_loopback
from edgeos.node.agents_api import agent_routes
from edgeos.node.guard import MB, Budgets, ResourceGuard
from edgeos.node.openai_api import openai_routes
from edgeos.node.service import FLEET_JOIN_FILE
from edgeos.node.status_api import status_routes
from edgeos.routing.build import build_router
from edgeos.routing.v2_venue import ClientCertificate
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.runtime.generative import GenerativeHost
from edgeos.runtime.v2_api import v2_routes
from edgeos.settings import NodeSettings
from edgeos.state import Database
from edgeos.state.writer import GroupWriter
from edgeos.telemetry import MetricsRegistry, tracing

if TYPE_CHECKING:
    from edgeos.connectors.config import ConnectorConfig
    from edgeos.connectors.events import Source
    from edgeos.connectors.vault import Vault
    from edgeos.routing.outbound import Outbound
    from edgeos.routing.router import Router
    from edgeos.sync.service import FleetService

log = logging.getLogger("edgeos.node")


def host_config(settings: NodeSettings) -> HostConfig:
    """The model host's configuration from the node's settings."""
    return HostConfig(
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        execution_providers=settings.execution_providers,
        allow_spinning=settings.allow_spinning,
        memory_budget_bytes=settings.model_memory_budget_mb * 1024 * 1024,
        inference_threads=settings.inference_threads,
    )


def fleet_configured(settings: NodeSettings, join_token: str | None = None) -> bool:
    """Whether the node follows a fleet: a fleet URL or join token, or an earlier enrollment."""
    data = settings.data_dir
    return bool(
        settings.fleet_url
        or join_token
        or (data / "fleet").is_dir()
        or (data / FLEET_JOIN_FILE).exists()
    )


class Node:
    """One node's live parts, opened together and closed together."""

    def __init__(self, settings: NodeSettings, *, join_token: str | None = None) -> None:
        self.settings = settings
        # Kept in memory only: a join token is a secret, used once.
        self._join_token = join_token
        #: The fleet's part of the node, when it follows a fleet (None otherwise).
        self.fleet: FleetService | None = None
        self.metrics = MetricsRegistry()
        self.db = Database(settings.database_path)
        self.registry = ModelRegistry(self.db, settings.model_store)
        self.host = ModelHost(self.registry, host_config(settings), self.metrics)
        self.generative = GenerativeHost(self.registry, self.metrics)
        self.writer = GroupWriter(self.db)
        self.delivery: DeliveryWorker | None = None
        self.connectors: dict[str, Connector] = {}
        self._bindings: dict[str, ConnectorConfig] = {}
        self.sources: list[Source] = []
        #: The queue of messages for cloud services and its task, when a binding declares
        #: an operation ``batch`` (None otherwise).
        self.outbound: Outbound | None = None
        self._vault: Vault | None = None
        self.guard = ResourceGuard(
            self.db,
            settings.data_dir,
            Budgets(
                memory_bytes=settings.memory_budget_mb * MB,
                disk_bytes=settings.disk_budget_mb * MB,
                disk_reserve_bytes=settings.disk_reserve_mb * MB,
            ),
            host=self.host,
            generative=self.generative,
            retention=self._retention,
            metrics=self.metrics,
        )
        self.executor = Executor(self.db, self.writer, host=self.host, on_effects=self._wake)
        #: Where agents' ``ctx.infer`` calls run (built by :meth:`open`, from venues.yaml).
        self.router: Router
        #: The API's local token (``DATA_DIR/api-token``), made by :meth:`open` if missing.
        self.local_token: tokens.LocalToken | None = None

    def open(self) -> Node:
        """Open the database (applying migrations) and read connector bindings.

        Raises StateError or ManifestError when either is unusable.
        """
        self.db.open()
        tokens.ensure_local_token(self.settings.data_dir)
        self.local_token = tokens.LocalToken(self.settings.data_dir)
        if self.settings.tracing:  # the OpenTelemetry SDK itself loads with the first span
            tracing.configure(
                tracing.TraceConfig(
                    keep_spans=self.settings.trace_keep_spans,
                    otlp_endpoint=self.settings.trace_otlp_endpoint,
                ),
                self.db.transaction,
            )
        path = self.settings.data_dir / "connectors.yaml"
        if path.exists():
            # Here, not at the top: the bindings are pydantic models, and a node without
            # connectors must not import pydantic (see tests/test_footprint.py).
            from edgeos.connectors.config import build_all, load_connectors
            from edgeos.connectors.contracts import node_contracts

            self._bindings = load_connectors(path)
            self.executor.contracts = node_contracts(self.settings.data_dir, self._bindings)
            self.connectors = build_all(self._bindings, self._secret)
            self.outbound = self._outbound()
        # What a kill in the middle of a model add or remove left behind.
        self.registry.sweep()
        if fleet_configured(self.settings, self._join_token):
            # Here, not at the top: a node without a fleet imports none of the sync code.
            from edgeos.sync.service import FleetService

            self.fleet = FleetService(
                self.settings, self.db, self.registry, host=self.host, metrics=self.metrics,
                join_token=self._join_token,
            )  # fmt: skip
            # Before any agent runs: a switch a crash cut off goes back to the last known good.
            self.fleet.recover()
            self.executor.policy = self.fleet.tighten
        self.executor.router = self.router = self._router()
        self.delivery = DeliveryWorker(
            self.db, self.connectors, metrics=self.metrics, contracts=self.executor.contracts
        )
        self.metrics.collector(agent_metrics(self.db))
        return self

    def close(self) -> None:
        """Release models and the database. Safe to call twice."""
        self.host.close()
        self.generative.close()
        tracing.shutdown()  # the spans still batched are written first
        self.db.close()

    def _wake(self) -> None:
        if self.delivery is not None:
            self.delivery.wake()

    async def start(self) -> None:
        """Start committing, delivering, running agents (resuming unfinished runs), listening
        to event sources and guarding resources."""
        self.writer.start()
        if self.delivery is not None:
            self.delivery.start()
        await self.executor.start()
        if self._bindings:
            from edgeos.connectors.events import start_sources

            self.sources = await start_sources(
                self._bindings, self.executor.emit, state_dir=self.settings.data_dir / "sources",
                secrets=self._secret,
            )  # fmt: skip
        self.guard.start()
        self.router.start()
        if self.outbound is not None:
            self.outbound.start()
        if self.fleet is not None:
            await self.fleet.start()

    async def stop(self) -> None:
        """Stop in the reverse order: no new events, no new steps, deliveries drained, writes
        committed."""
        if self.fleet is not None:
            await self.fleet.stop()
        await self.guard.stop()
        self.router.close()
        if self.outbound is not None:
            await self.outbound.stop()
        if self.sources:
            from edgeos.connectors.events import stop_sources

            await stop_sources(self.sources)
            self.sources = []
        await self.executor.stop()
        if self.delivery is not None:
            await self.delivery.stop()
        for connector in self.connectors.values():
            await connector.close()
        self.writer.stop()

    def _router(self) -> Router:
        """Where ``ctx.infer`` calls run: the host and the venues of ``venues.yaml``."""
        path = self.settings.data_dir / "venues.yaml"
        config = None
        if path.exists():  # pydantic models, as connectors.yaml: read only when there is one
            from edgeos.routing.config import load_venues

            config = load_venues(path)
        if self.fleet is None:
            return build_router(self.host, config, source=str(path), metrics=self.metrics,
                                generative=self.generative, secrets=self._secret)  # fmt: skip
        from edgeos.sync.identity import FleetPaths, load_identity

        identity, policy = load_identity(self.settings.data_dir), self.fleet.policy
        paths = FleetPaths.of(self.settings.data_dir)
        return build_router(
            self.host, config, source=str(path), metrics=self.metrics,
            generative=self.generative, fleet_url=identity.url if identity else self.settings.fleet_url,
            certificate=ClientCertificate(paths.ca, paths.cert, paths.key),
            cloud_rule=lambda privacy: policy.current().venue_for(privacy),
            secrets=self._secret,
        )  # fmt: skip

    def _outbound(self) -> Outbound | None:
        """The outbound queue, handed the effects of HTTP operations declared ``batch``."""
        from edgeos.connectors.http import HttpConnector, outbound_sender

        http = [c for c in self.connectors.values() if isinstance(c, HttpConnector)]
        batches = [op.batch for c in http for op in c.operations.values() if op.batch]
        if not batches:
            return None
        from edgeos.routing.outbound import Outbound, OutboundQueue

        # One queue for every service: its batches are as large as the smallest declared.
        queue = OutboundQueue(self.db, max_batch_bytes=min(b.max_batch_bytes for b in batches))
        outbound = Outbound(queue, outbound_sender(self.connectors), metrics=self.metrics)
        for connector in http:
            connector.outbound = outbound
        return outbound

    def _secret(self, name: str, scope: str) -> str:
        # The vault (and its cryptography import) is opened when a connector first asks.
        if self._vault is None:
            from edgeos.connectors.vault import Vault, load_key

            self._vault = Vault(self.db, load_key(self.settings.data_dir))
        return self._vault.get(name, scope=scope)

    def _retention(self, now: float) -> None:
        from edgeos.agents.retention import apply_retention

        apply_retention(self.db, now=now, tighten=self.executor.policy)

    def fleet_state(self) -> dict[str, Any] | None:
        """The live fleet link, when the node follows a fleet."""
        return None if self.fleet is None else self.fleet.status()

    def app(self) -> ApiAccess:
        """The node's ASGI application, behind its token check (:mod:`.access`)."""

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            # Everything allocated at start-up lives as long as the node: keep it out of
            # the collector's way, so collections during requests stay short.
            gc.collect()
            gc.freeze()
            await self.start()
            log.info("node ready, data in %s", self.settings.data_dir)
            try:
                yield
            finally:
                await self.stop()
                self.close()
                log.info("node stopped")

        async def metrics(request: Request) -> Response:
            return Response(
                self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
            )

        routes = [
            *v2_routes(self.host),
            *openai_routes(self.generative, self.host, self.router),
            *agent_routes(self.executor),
            *status_routes(self),
            Route("/metrics", metrics, methods=["GET"]),
        ]
        return ApiAccess(
            Starlette(routes=routes, lifespan=lifespan), self.db, self.local_token,
            certificates=self.settings.tls_client_ca_file is not None,
        )  # fmt: skip


def run_node(settings: NodeSettings, *, join_token: str | None = None) -> None:
    """Run a node in the foreground until SIGTERM or SIGINT.

    ``join_token`` enrolls the node in its fleet (``settings.fleet_url``) if it has not
    enrolled yet, or comes back after a revocation; it is never stored nor logged.
    """
    import uvicorn

    from edgeos.node import heap
    from edgeos.node.server import NodeServer

    heap.tune()  # before any model or buffer is allocated

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    tls = api_tls.uvicorn_options(settings)
    node = Node(settings, join_token=join_token).open()
    if not tls and not is_loopback(settings.host):
        log.warning(
            "the API listens on %s over plain HTTP: API tokens cross the network in the "
            "clear; set tls_cert_file and tls_key_file, or keep host at 127.0.0.1",
            settings.host,
        )
    config = uvicorn.Config(
        node.app(),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        # The API has no WebSocket routes: not loading a WebSocket stack saves 1 MB.
        # uvloop and httptools stay ("auto"): plain asyncio and h11 would save 2.5 MB
        # more but serve slower (bench/serving.py, bench/footprint.py).
        ws="none",
        **tls,
    )
    if settings.tls_client_ca_file is not None and tls:
        config.load()  # makes the server's SSL context, which the callers' checks go into
        assert config.ssl is not None
        api_tls.check_callers(config.ssl, settings)
    NodeServer(config).run()
