"""Routing test helpers: a node database with the demo models, real V2 servers on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from edgeos.demo.train import DemoModels
from edgeos.routing.monitor import LinkMonitor
from edgeos.routing.router import Router
from edgeos.routing.v2_venue import V2Venue
from edgeos.routing.venues import LocalVenue, Offer, Venue, VenueInfo
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.runtime.v2_api import v2_routes
from edgeos.state import Database
from tests.fleet_support import free_port
from tests.loopback import UvicornThread

SMALL, XL = "stockout-risk", "stockout-risk-xl"


def demo_host(db: Database, root: Path, demo: DemoModels, names: tuple[str, ...]) -> ModelHost:
    """A model host over ``db`` with the named demo models registered."""
    registry = ModelRegistry(db, root / "models")
    for name in names:
        registry.add(demo.models[name], name=name, manifest=demo.manifests[name])
    return ModelHost(registry, HostConfig())


class V2Server:
    """A real V2 server (the node's own routes over a host) on a loopback port, in a thread.

    ``delay_s`` holds every inference request back that long (a slow link or a loaded
    venue); ``requests`` counts the inference requests that reached it.
    """

    def __init__(self, host: ModelHost, *, delay_s: float = 0.0, port: int | None = None) -> None:
        self.host = host
        self.delay_s = delay_s
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        self._served: UvicornThread | None = None
        routes = Starlette(routes=v2_routes(host))

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"].endswith("/infer"):
                self.requests += 1
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
            await routes(scope, receive, send)

        self._app = app

    def start(self) -> V2Server:
        """Serve (again) on the same port."""
        config = uvicorn.Config(self._app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")  # fmt: skip
        self._served = UvicornThread(config, name="the V2 server")
        return self

    def stop(self) -> None:
        """Stop serving: the port refuses connections afterwards."""
        if self._served is not None:
            self._served.stop()
            self._served = None


def remote(
    name: str,
    url: str,
    *,
    price: float,
    models: dict[str, Offer],
    api_key: str | None = None,
    **info: Any,
) -> V2Venue:
    """A V2 venue off the device (presenting ``api_key`` as its API token, if given)."""
    return V2Venue(
        VenueInfo(name, on_device=False, price_per_call=price, models=models, **info),
        url,
        api_key=None if api_key is None else lambda: api_key,
    )


def router_of(host: ModelHost, *venues: Venue, interval: float = 2.0, **kwargs: Any) -> Router:
    """A router over the local host and ``venues``."""
    everything: list[Venue] = [LocalVenue(host), *venues]
    return Router(everything, LinkMonitor(everything, interval=interval), **kwargs)
