"""Alerts over HTTP (``/api/v1/alerts``): rules operators set, what fires, what was sent.

- ``POST /api/v1/alerts/rules`` ``{name, condition, webhook, target, per, window_s,
  secret}`` (deploy) → the rule; ``GET /api/v1/alerts/rules`` (read); ``DELETE
  /api/v1/alerts/rules/{id}`` (deploy).
- ``GET /api/v1/alerts`` (read): what fires now; ``GET
  /api/v1/alerts/notifications?limit=`` (read): the newest notifications and their delivery.

Each change runs in one transaction with its audit row; a refusal is audited alone and
changes nothing. A rule's secret is never echoed or audited.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.fleet import alerts
from edgeos.fleet.audited import audited_body, audited_change
from edgeos.fleet.auth import require_operator
from edgeos.fleet.context import fleet_context
from edgeos.fleet.web import json_response, query_int
from edgeos.protocol.fleet import API


class AlertRuleCreate(BaseModel):
    """``POST /api/v1/alerts/rules``: when to alert, about which devices, and whom."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")
    condition: str = Field(
        max_length=64, description="p99_ms>250, success_rate<0.95, drift>0.3 or offline>10m"
    )
    webhook: str = Field(max_length=2048, description="http(s) URL notifications are POSTed to")
    target: str = Field(default="all", max_length=512, description="device selector")
    per: str = Field(
        default="device", description="device, or agent or model for fleet-wide figures"
    )
    window_s: float = Field(
        default=alerts.DEFAULT_WINDOW_S, gt=0, description="KPI rules: seconds judged"
    )
    secret: str | None = Field(
        default=None, min_length=16, max_length=256, repr=False,
        description="signs every notification (X-Edgeos-Signature, HMAC-SHA256)",
    )  # fmt: skip


def _described(rule: dict[str, Any]) -> tuple[str, str]:
    """A rule's audit target and detail (its webhook shown as given: the API keeps only
    what operators may see)."""
    detail = f"{rule['name']}: {rule['condition']} on {rule['target']} to {rule['webhook']}"
    return f"alert-rule/{rule['id']}", detail


def alerts_routes() -> list[Route]:
    """The alert routes."""

    async def create(request: Request) -> Response:
        op = await require_operator(request, "deploy")
        ctx = fleet_context(request)
        body = await audited_body(request, AlertRuleCreate, op, "alert_rule.create")

        def work(conn: Connection) -> dict[str, Any]:
            return alerts.create_rule(
                conn, name=body.name, condition=body.condition, webhook=body.webhook,
                target=body.target, per=body.per, window_s=body.window_s, secret=body.secret,
                actor=op.actor, now=time.time(),
            )  # fmt: skip

        what = f"alert-rule {body.name!r}"
        rule = await run_in_threadpool(
            audited_change, ctx, op, "alert_rule.create", what, work, describe=_described
        )
        return json_response(rule, 201)

    async def list_rules(request: Request) -> Response:
        await require_operator(request, "read")
        ctx = fleet_context(request)

        def work() -> list[dict[str, Any]]:
            with ctx.db.read() as conn:
                return alerts.list_rules(conn)

        return json_response(await run_in_threadpool(work))

    async def delete(request: Request) -> Response:
        op = await require_operator(request, "deploy")
        ctx, rule_id = fleet_context(request), request.path_params["rule_id"]

        def work(conn: Connection) -> dict[str, Any]:
            return alerts.delete_rule(conn, rule_id)

        what = f"alert-rule/{rule_id}"
        rule = await run_in_threadpool(
            audited_change, ctx, op, "alert_rule.delete", what, work, describe=_described
        )
        return json_response(rule)

    async def firing(request: Request) -> Response:
        await require_operator(request, "read")
        ctx = fleet_context(request)

        def work() -> list[dict[str, Any]]:
            with ctx.db.read() as conn:
                return alerts.firing(conn)

        return json_response(await run_in_threadpool(work))

    async def sent(request: Request) -> Response:
        await require_operator(request, "read")
        ctx = fleet_context(request)
        limit = query_int(request, "limit", 100, low=1, high=10_000)

        def work() -> list[dict[str, Any]]:
            with ctx.db.read() as conn:
                return alerts.notifications(conn, limit)

        return json_response(await run_in_threadpool(work))

    return [
        Route(f"{API}/alerts/rules", create, methods=["POST"]),
        Route(f"{API}/alerts/rules", list_rules, methods=["GET"]),
        Route(f"{API}/alerts/rules/{{rule_id}}", delete, methods=["DELETE"]),
        Route(f"{API}/alerts", firing, methods=["GET"]),
        Route(f"{API}/alerts/notifications", sent, methods=["GET"]),
    ]
