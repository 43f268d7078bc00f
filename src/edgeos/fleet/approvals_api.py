"""Approvals over HTTP: devices report escalations, operators answer them.

- ``POST /api/v1/escalations`` (device, mTLS): an ``EscalationReport`` in, the answers
  waiting for the device out. The body's ``device_id`` must be the certificate's.
- ``GET /api/v1/approvals?state=&device=`` (read), ``POST
  /api/v1/approvals/{device_id}/{escalation_id}`` ``{"choice", "note"}`` (deploy).

Refusals are audited in a transaction of their own and change nothing else.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.errors import PermissionDeniedError
from edgeos.fleet import approvals
from edgeos.fleet.audited import audited_body, audited_change
from edgeos.fleet.auth import Operator, require_device, require_operator
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.db import audit_refusal
from edgeos.fleet.web import json_response, query_int
from edgeos.protocol.fleet import API, EscalationAnswers, EscalationReport


class ApprovalAnswer(BaseModel):
    """``POST /api/v1/approvals/{device_id}/{escalation_id}``: the operator's answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    choice: Any = Field(description="one of the escalation's options")
    note: str | None = Field(default=None, max_length=1000)


def answer_as(
    ctx: FleetContext,
    op: Operator,
    device_id: str,
    escalation_id: str,
    choice: Any,
    note: str | None,
) -> dict[str, Any]:
    """Answer in a transaction of its own, audited; a refusal is audited alone.

    The dashboard's forms and the API both answer through here.
    """
    target = _target(device_id, escalation_id)

    def work(conn: Connection) -> dict[str, Any]:
        return approvals.answer(conn, device_id, escalation_id, choice, actor=op.actor, note=note)

    return audited_change(
        ctx, op, "approval.answer", target, work,
        describe=lambda row: (target, f"answer {row['answer']!r}"),
    )  # fmt: skip


def _target(device_id: str, escalation_id: str) -> str:
    return f"device/{device_id}/escalation/{escalation_id}"


def _exchange(ctx: FleetContext, device_id: str, report: EscalationReport) -> EscalationAnswers:
    with ctx.db.begin() as conn:
        approvals.record_report(conn, device_id, report)
        return EscalationAnswers(answers=approvals.pending_answers(conn, device_id))


async def report_escalations(request: Request) -> Response:
    identity = await require_device(request)
    ctx = fleet_context(request)
    report = await audited_body(request, EscalationReport, identity, "escalations.report")
    if report.device_id != identity.device_id:
        refused = PermissionDeniedError(
            f"device {identity.device_id} reported escalations as device {report.device_id}"
        )
        await run_in_threadpool(
            audit_refusal, ctx.db, actor=identity.actor, action="escalations.report",
            target=request.url.path, detail=str(refused),
        )  # fmt: skip
        raise refused
    return json_response(await run_in_threadpool(_exchange, ctx, identity.device_id, report))


async def list_approvals(request: Request) -> Response:
    await require_operator(request, "read")
    ctx = fleet_context(request)
    state = request.query_params.get("state") or None
    device = request.query_params.get("device") or None
    limit = query_int(request, "limit", 500, low=1, high=100_000)

    def work() -> list[dict[str, Any]]:
        with ctx.db.read() as conn:
            return approvals.list_escalations(conn, state=state, device_id=device, limit=limit)

    return json_response(await run_in_threadpool(work))


async def answer_approval(request: Request) -> Response:
    op = await require_operator(request, "deploy")
    ctx = fleet_context(request)
    device_id = request.path_params["device_id"]
    escalation_id = request.path_params["escalation_id"]
    body = await audited_body(
        request, ApprovalAnswer, op, "approval.answer", target=_target(device_id, escalation_id)
    )
    row = await run_in_threadpool(
        answer_as, ctx, op, device_id, escalation_id, body.choice, body.note
    )
    return json_response(row)


def approvals_routes() -> list[Route]:
    """The device and operator routes of approvals."""
    return [
        Route(f"{API}/escalations", report_escalations, methods=["POST"]),
        Route(f"{API}/approvals", list_approvals, methods=["GET"]),
        Route(f"{API}/approvals/{{device_id}}/{{escalation_id}}", answer_approval,
              methods=["POST"]),
    ]  # fmt: skip
