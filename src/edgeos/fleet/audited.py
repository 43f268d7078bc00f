"""Operators' changes with their audit rows.

A change and its audit row commit in one transaction; a refused change (bad body, a
rule it breaks) is audited on its own, and nothing else is kept. Every operator route
that changes something goes through here, so none can forget its row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from pydantic import BaseModel
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from edgeos.errors import EdgeOSError
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.db import audit_refusal, write_audit
from edgeos.fleet.web import parse_body

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class Actor(Protocol):
    """Who acts: an operator or a device, as the audit log names it."""

    @property
    def actor(self) -> str:
        """The audit log's name for this actor."""
        ...


def audited_change(
    ctx: FleetContext,
    op: Actor,
    action: str,
    target: str,
    work: Callable[[Connection], T],
    *,
    describe: Callable[[T], tuple[str, str | None]] | None = None,
) -> T:
    """Run ``work`` in a transaction with its audit row; a refusal is audited alone.

    ``describe`` turns the result into the row's target and detail, for changes whose
    subject is only known once made (a new rule's id); it must never name a secret.
    """
    try:
        with ctx.db.begin() as conn:
            result = work(conn)
            what, detail = describe(result) if describe is not None else (target, None)
            write_audit(
                conn, actor=op.actor, action=action, target=what, outcome="ok", detail=detail
            )
    except EdgeOSError as exc:
        audit_refusal(ctx.db, actor=op.actor, action=action, target=target, detail=str(exc))
        raise
    return result


async def audited_body(
    request: Request, model: type[M], op: Actor, action: str, *, target: str | None = None
) -> M:
    """The request's body as ``model``; a malformed one is audited as a refusal.

    ``target`` names what the refused change was about (the request's path by default).
    """
    try:
        return await parse_body(request, model)
    except EdgeOSError as exc:
        ctx = fleet_context(request)
        await run_in_threadpool(
            audit_refusal, ctx.db, actor=op.actor, action=action, target=target or request.url.path,
            detail=str(exc),
        )  # fmt: skip
        raise
