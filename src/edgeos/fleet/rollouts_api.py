"""The rollouts part of the operator API (``/api/v1/rollouts``).

Creating and steering a rollout needs the ``deploy`` scope, reading one ``read``. Each
change runs in one transaction on the thread pool; a refused one (malformed body,
unknown artifact or target, a rollout in the way) is audited and changes nothing else.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.errors import EdgeOSError
from edgeos.fleet.auth import Operator, require_operator
from edgeos.fleet.db import FleetDatabase, audit_refusal
from edgeos.fleet.rollout_engine import RolloutEngine
from edgeos.fleet.rollouts import parse_artifact_ref
from edgeos.fleet.web import json_response, parse_body
from edgeos.manifests.durations import Duration
from edgeos.protocol.fleet import API


def _waves(value: Any) -> Any:
    # The CLI's spelling ("1,10,50,100") is accepted as well as a JSON list.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")]
    return value


class RolloutCreate(BaseModel):
    """``POST /api/v1/rollouts``: what to roll out, to which devices, how carefully."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    artifact: str = Field(description="KIND/NAME@VERSION, e.g. model/stockout-risk@4")
    target: str = Field(description="selector: all, group=G, label:K=V, device=ID; commas AND")
    waves: Annotated[list[int], BeforeValidator(_waves)] = Field(
        default=[1, 10, 50, 100], description="cumulative percentages ending at 100"
    )
    soak_s: Duration = Field(default=600.0, description="seconds (or 30s, 10m, 1h) per wave")
    gates: list[str] = Field(default=[], description="METRIC<=LIMIT, e.g. failure_rate<=+0.02")


def rollouts_routes(db: FleetDatabase) -> list[Route]:
    """The rollout routes over ``db``."""
    engine = RolloutEngine(db)

    async def refused(op: Operator, action: str, target: str, exc: EdgeOSError) -> None:
        await run_in_threadpool(
            audit_refusal, db, actor=op.actor, action=action, target=target, detail=str(exc)
        )

    async def create(request: Request) -> Response:
        op = await require_operator(request, "deploy")
        try:
            body = await parse_body(request, RolloutCreate)
            ref = parse_artifact_ref(body.artifact)
        except EdgeOSError as exc:
            await refused(op, "rollout.create", request.url.path, exc)
            raise
        status = await run_in_threadpool(
            engine.create,
            ref=ref,
            selector=body.target,
            waves=body.waves,
            soak_s=body.soak_s,
            gates=body.gates,
            actor=op.actor,
        )
        return json_response(status, 201)

    async def list_all(request: Request) -> Response:
        await require_operator(request, "read")
        return json_response(await run_in_threadpool(engine.list_rollouts))

    async def show(request: Request) -> Response:
        await require_operator(request, "read")
        return json_response(
            await run_in_threadpool(engine.status, request.path_params["rollout_id"])
        )

    def action(name: str) -> Route:
        async def handle(request: Request) -> Response:
            op = await require_operator(request, "deploy")
            act = {"pause": engine.pause, "resume": engine.resume, "abort": engine.abort}[name]
            status = await run_in_threadpool(act, request.path_params["rollout_id"], op.actor)
            return json_response(status)

        return Route(f"{API}/rollouts/{{rollout_id}}/{name}", handle, methods=["POST"])

    return [
        Route(f"{API}/rollouts", create, methods=["POST"]),
        Route(f"{API}/rollouts", list_all, methods=["GET"]),
        Route(f"{API}/rollouts/{{rollout_id}}", show, methods=["GET"]),
        action("pause"),
        action("resume"),
        action("abort"),
    ]
