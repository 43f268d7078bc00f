"""Serving the fleet: uvicorn with TLS from the data directory's keys.

A SIGTERM first answers every waiting long poll (devices hear their current state at
once), then uvicorn drains the rest within a bound.

The server asks every client for a certificate without requiring one (operators and
enrolling devices have none); a certificate that does not chain to the fleet CA fails
the handshake, and the app checks the rest.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Any

from edgeos.fleet.app import create_app
from edgeos.fleet.settings import FleetConfig
from edgeos.security.tls import ServerTLS


def uvicorn_config(config: FleetConfig, *, log_level: str = "info") -> Any:
    """The ``uvicorn.Config`` of a fleet replica (keys and database initialized)."""
    import uvicorn

    return uvicorn.Config(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        ws="none",
        # Long polls hold a connection up to a minute; keep idle ones a little longer
        # than a device's sync interval so a device reuses its TLS session.
        timeout_keep_alive=max(5, int(config.sync_interval_s) + 5),
        # Idle TLS clients may take asyncio's 30 s to answer a close: bound the drain.
        timeout_graceful_shutdown=10,
        # Thousands of devices reconnecting at once (a fleet restart, a network blip)
        # must queue in the kernel, not be dropped: a dropped SYN costs a device 1-3 s.
        backlog=4096,
        **ServerTLS.in_dir(config.keys_dir).uvicorn_options(),
    )


def run_fleet(config: FleetConfig, *, log_level: str = "info") -> None:
    """Serve the fleet in the foreground until SIGTERM or SIGINT."""
    import uvicorn

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from starlette.applications import Starlette

    class FleetServer(uvicorn.Server):
        """uvicorn's server, answering waiting long polls as soon as a signal says stop."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            app = self.config.app
            if isinstance(app, Starlette):
                # Signal handlers run between bytecodes of the loop's thread: hand over.
                asyncio.get_running_loop().call_soon_threadsafe(app.state.watcher.close)

    if config.cloud_ray is not None:
        # Connect and deploy before serving: a cluster that does not answer stops the
        # start with its reason, and the first device call does not wait for replicas.
        from edgeos.fleet.cloud_ray import deploy

        deploy(config.cloud_ray, config.cloud_replicas)
    FleetServer(uvicorn_config(config, log_level=log_level)).run()
