"""The fleet's ASGI application: routes, error handling, background work.

``create_app`` builds one replica over the data directory's keys and the database; it
keeps no state of its own beyond caches, so several replicas can share one database.
The lifespan runs four loops: the revision watcher (long polls), the TUF re-signer
(keeps the timestamp fresh), the rollout engine and the alert engine (judges rules, sends
their webhooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from edgeos import __version__
from edgeos.errors import EdgeOSError
from edgeos.fleet.admin_api import admin_routes
from edgeos.fleet.alerts import AlertEngine
from edgeos.fleet.alerts_api import alerts_routes
from edgeos.fleet.approvals_api import approvals_routes
from edgeos.fleet.auth import require_device
from edgeos.fleet.cloud_venue import cloud_venue_routes
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.dashboard import dashboard_routes
from edgeos.fleet.db import FleetDatabase
from edgeos.fleet.enrollment import enroll
from edgeos.fleet.keystore import load_keys, open_repository
from edgeos.fleet.memory_api import memory_routes
from edgeos.fleet.openapi import openapi_document
from edgeos.fleet.rollout_engine import RolloutEngine
from edgeos.fleet.rollouts_api import rollouts_routes
from edgeos.fleet.run_relay_api import run_relay_routes
from edgeos.fleet.secrets_api import secrets_routes
from edgeos.fleet.settings import FleetConfig
from edgeos.fleet.sync_api import RevisionWatcher, sync_routes
from edgeos.fleet.telemetry_api import FleetMetrics, telemetry_routes
from edgeos.fleet.tuf_api import tuf_routes
from edgeos.fleet.web import error_response, json_response, parse_body
from edgeos.protocol.fleet import API, EnrollRequest, ErrorBody

log = logging.getLogger("edgeos.fleet")

#: How often the rollout engine acts on running rollouts.
ROLLOUT_TICK_S = 1.0
#: How often alert rules are judged and their notifications sent.
ALERT_TICK_S = 10.0
#: How often a SQLite database's WAL is copied into its file (off the requests' path).
CHECKPOINT_S = 1.0


async def _ca(request: Request) -> Response:
    return Response(fleet_context(request).ca_pem, media_type="application/x-pem-file")


async def _health(request: Request) -> Response:
    return json_response({"status": "ok", "version": __version__})


async def _enroll(request: Request) -> Response:
    ctx = fleet_context(request)
    body = await parse_body(request, EnrollRequest)
    return json_response(await run_in_threadpool(enroll, ctx, body), 201)


async def _on_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, EdgeOSError):
        return error_response(exc)
    raise exc


async def _on_crash(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    body = ErrorBody(error="internal", message=f"internal error: {type(exc).__name__}")
    return json_response(body, 500)


async def _every(interval_s: float, what: str, work: Any) -> None:
    """Run the blocking ``work`` on the thread pool every ``interval_s`` until cancelled."""
    while True:
        try:
            await run_in_threadpool(work)
        except Exception:  # the database hiccuped: try again next time
            log.exception("%s failed", what)
        await asyncio.sleep(interval_s)


def create_app(config: FleetConfig, *, background: bool = True) -> Starlette:
    """A fleet replica over ``config``'s keys and database (initialized by ``init_fleet``).

    ``background=False`` leaves the periodic loops off (for tests that drive them).
    """
    keys = load_keys(config)
    db = FleetDatabase(config.database_url)
    ctx = FleetContext(config=config, db=db, ca=keys.ca, tuf=open_repository(config, db, keys))
    watcher = RevisionWatcher(db, config.revision_poll_s)
    engine = RolloutEngine(db)
    alert_engine = AlertEngine(db)
    metrics = FleetMetrics(db)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # What start-up allocated lives as long as the replica: out of the collector's
        # way, so collections while serving stay short (they show in sync p99).
        gc.collect()
        gc.freeze()
        # Every kept device connection is a few dozen long-lived objects: with the default
        # thresholds, full collections over ten thousand of them (half a second each, and
        # nothing to collect) ran every few seconds and stalled every request.
        gc.set_threshold(50_000, 20, 100)
        tasks: list[asyncio.Task[None]] = []
        if background:
            loops: list[Coroutine[Any, Any, None]] = [
                watcher.run(),
                _every(
                    config.timestamp_check_s, "re-signing TUF metadata", ctx.tuf.refresh_timestamp
                ),
                # A tick runs in a worker thread of the pool, which shutdown awaits before
                # it closes the database under it.
                _every(ROLLOUT_TICK_S, "moving rollouts on", engine.tick),
                _every(ALERT_TICK_S, "judging alerts", alert_engine.tick),
            ]
            if db.is_sqlite:
                loops.append(_every(CHECKPOINT_S, "checkpointing the database", db.checkpoint))
            tasks = [asyncio.create_task(loop) for loop in loops]
        log.info("fleet ready, database %s", db.engine.url.render_as_string(hide_password=True))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            db.close()

    routes: list[BaseRoute] = [
        Route(f"{API}/ca", _ca, methods=["GET"]),
        Route(f"{API}/health", _health, methods=["GET"]),
        Route(f"{API}/enroll", _enroll, methods=["POST"]),
        *sync_routes(watcher),
        *admin_routes(),
        *rollouts_routes(db),
        *alerts_routes(),
        *secrets_routes(),
        *approvals_routes(),
        *run_relay_routes(),
        *memory_routes(),
        *cloud_venue_routes(),
        *telemetry_routes(metrics),
        *tuf_routes(lambda: ctx.tuf, require_device),
    ]
    document = openapi_document(routes, __version__)

    async def _openapi(request: Request) -> Response:
        return json_response(document)

    routes.append(Route(f"{API}/openapi.json", _openapi, methods=["GET"]))
    routes += dashboard_routes(config.keys_dir, engine)  # pages, not API: not in the document
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={EdgeOSError: _on_error, 500: _on_crash},
        middleware=[metrics.middleware()],
    )
    app.state.fleet = ctx
    app.state.watcher = watcher
    return app
