"""``GET /api/status``: the node's snapshot (:mod:`edgeos.node.status`) as JSON."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.node.status import collect_status, process_started_at

if TYPE_CHECKING:
    from edgeos.runtime import ModelHost
    from edgeos.runtime.generative import GenerativeHost
    from edgeos.settings import NodeSettings
    from edgeos.state import Database


class NodeLike(Protocol):
    """What the status route needs of a node (``edgeos.node.daemon.Node`` has it)."""

    @property
    def db(self) -> Database:
        """The node database."""

    @property
    def host(self) -> ModelHost:
        """The live model host."""

    @property
    def generative(self) -> GenerativeHost:
        """The live host of generative models."""

    @property
    def settings(self) -> NodeSettings:
        """The node's settings."""

    def fleet_state(self) -> dict[str, Any] | None:
        """The live fleet link, when the node follows a fleet."""


def status_routes(node: NodeLike) -> list[Route]:
    """The status route over a running node."""
    started_at = process_started_at()

    async def status(request: Request) -> Response:
        # Off the event loop: the snapshot reads the database and walks the data directory.
        snapshot = await asyncio.to_thread(
            collect_status, node.db, node.settings, host=node.host,
            generative=node.generative, started_at=started_at, fleet_live=node.fleet_state(),
        )  # fmt: skip
        return Response(snapshot.dumps(), media_type="application/json")

    return [Route("/api/status", status, methods=["GET"])]
