"""The node's HTTP API for agents, runs and approvals (``/api/...``), in JSON."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.agents import manage, store
from edgeos.agents.executor import Executor
from edgeos.errors import EdgeOSError, InvalidRequestError, NotFoundError
from edgeos.node.tokens import LOCAL, Principal
from edgeos.state import journal
from edgeos.telemetry import tracing


def _json(doc: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS),
        status_code=status,
        media_type="application/json",
    )


def _error(exc: EdgeOSError) -> Response:
    return _json({"error": str(exc)}, exc.http_status)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return doc


def answered_by(request: Request, claimed: Any) -> str:
    """Who the journal says answered: a named token's name (with the person its caller
    names, if any); for the local token, whom the caller names."""
    principal: Principal | None = getattr(request.state, "principal", None)
    named = str(claimed) if claimed else None
    if principal is None or principal.name == LOCAL:
        return named or "api"
    return principal.name if named is None else f"{named} via {principal.name}"


def agent_routes(executor: Executor) -> list[Route]:
    """Routes over one executor and its database."""
    db = executor.db

    async def list_agents(request: Request) -> Response:
        return _json(
            [
                {"name": a.name, "version": a.version, "paused": a.paused,
                 "runs": store.state_counts(db, a.name)}
                for a in store.agents(db)
            ]
        )  # fmt: skip

    async def start_run(request: Request) -> Response:
        try:
            body = await _body(request)
            run_id = await executor.submit(
                request.path_params["name"], trigger="manual", data=body.get("input")
            )
        except EdgeOSError as exc:
            return _error(exc)
        return _json({"run_id": run_id}, 201)

    async def webhook(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            agent = store.agent(db, name)
            if not any(t.webhook for t in agent.manifest.triggers):
                raise NotFoundError(f"agent '{name}' has no webhook trigger")
            run_id = await executor.submit(name, trigger="webhook", data=await _body(request))
        except EdgeOSError as exc:
            return _error(exc)
        return _json({"run_id": run_id}, 202)

    async def event(request: Request) -> Response:
        try:
            run_ids = await executor.emit(request.path_params["name"], await _body(request))
        except EdgeOSError as exc:
            return _error(exc)
        return _json({"run_ids": run_ids}, 202)

    async def show_run(request: Request) -> Response:
        try:
            run = store.run(db, request.path_params["run_id"])
        except EdgeOSError as exc:
            return _error(exc)
        records = journal.for_run(db, run.id)
        # The input as journaled: personal fields of the triggering event are pseudonyms
        # there, while the run's own row keeps the values its steps need.
        started = next((r.payload for r in records if r.kind == "run_started"), {})
        trace = tracing.trace_id(run.id)
        spans = tracing.spans_of_trace(db.reader(), trace)
        return _json(
            {
                "id": run.id, "agent": run.agent, "state": run.state, "trigger": run.trigger,
                "input": started.get("input", run.input), "outcome": run.outcome, "error": run.error,
                "cost": run.cost, "created_at": run.created_at, "finished_at": run.finished_at,
                "journal": [
                    {"seq": r.seq, "kind": r.kind, "step": r.step, "at": r.at,
                     "payload": r.payload}
                    for r in records
                ],
                # The run's trace as a timeline (parents first; empty when tracing is off).
                "trace_id": trace, "trace": [s.to_json() for s in spans],
            }
        )  # fmt: skip

    def allowed(request: Request, run_id: str) -> bool:
        """Whether the caller may see and answer the questions of run ``run_id``."""
        principal: Principal | None = getattr(request.state, "principal", None)
        return principal is None or principal.allows("approve", store.run(db, run_id).agent)

    async def approvals(request: Request) -> Response:
        return _json(
            [
                {"id": e.id, "run_id": e.run_id, "step": e.step, "question": e.question,
                 "options": e.options, "proposal": e.proposal, "default": e.default,
                 "deadline": e.deadline}
                for e in store.escalations(db, state="open")
                if allowed(request, e.run_id)
            ]
        )  # fmt: skip

    async def answer(request: Request) -> Response:
        try:
            body = await _body(request)
            if "choice" not in body:
                raise InvalidRequestError('give the answer as {"choice": ...}')
            question = store.escalation(db, request.path_params["escalation_id"])
            principal: Principal | None = getattr(request.state, "principal", None)
            if principal is not None:
                principal.require("approve", store.run(db, question.run_id).agent)
            done = manage.answer(
                db,
                request.path_params["escalation_id"],
                body["choice"],
                by=answered_by(request, body.get("by")),
                note=body.get("note"),
            )
        except EdgeOSError as exc:
            return _error(exc)
        executor.nudge()
        return _json({"answered": done}, 200 if done else 409)

    return [
        Route("/api/agents", list_agents, methods=["GET"]),
        Route("/api/agents/{name}/runs", start_run, methods=["POST"]),
        Route("/api/agents/{name}/webhook", webhook, methods=["POST"]),
        Route("/api/events/{name}", event, methods=["POST"]),
        Route("/api/runs/{run_id}", show_run, methods=["GET"]),
        Route("/api/approvals", approvals, methods=["GET"]),
        Route("/api/approvals/{escalation_id}", answer, methods=["POST"]),
    ]
