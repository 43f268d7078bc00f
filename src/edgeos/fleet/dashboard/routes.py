"""The dashboard's routes under ``/ui/``: sign-in, pages, and the forms that act.

Every page needs a signed-in operator with the ``read`` scope (the audit log ``admin``);
every form that changes something needs the session's CSRF secret, a same-origin
request, and the scope its API twin needs (``deploy`` to answer an approval or steer a
rollout). A refusal is answered with 403 and written to the audit log. Actions go
through the same functions as the API, so they are audited the same way.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from edgeos.errors import AuthenticationError, ConfigError, EdgeOSError, PermissionDeniedError
from edgeos.fleet.approvals_api import answer_as
from edgeos.fleet.auth import Operator, check_operator
from edgeos.fleet.context import FleetContext, fleet_context
from edgeos.fleet.dashboard import pages, runs
from edgeos.fleet.dashboard.render import PREFIX, esc, page, url
from edgeos.fleet.dashboard.session import (
    COOKIE,
    SESSION_TTL_S,
    Session,
    SessionSigner,
    same_secret,
    session_operator,
)
from edgeos.fleet.db import audit_refusal, write_audit
from edgeos.fleet.rollout_engine import RolloutEngine

LOGIN_COOKIE = "edgeos_login_csrf"
#: The largest form body the dashboard reads.
MAX_FORM_BYTES = 64 * 1024
_STATIC = Path(__file__).with_name("static")
_HEADERS = {
    # No script runs on these pages; forms post only here; no framing.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a browser posts forms with `Origin: null`.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Handler = Callable[[Request], Awaitable[Response]]


def _html(content: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(content, status_code=status, headers=_HEADERS)


def _error_page(exc: EdgeOSError, op: Operator | None = None, csrf: str = "") -> HTMLResponse:
    title = {401: "Not signed in", 403: "Not allowed", 404: "Not found", 409: "Conflict"}.get(
        exc.http_status, "Refused"
    )
    return _html(page(title, f'<p class="error">{esc(exc)}</p>', op, csrf), exc.http_status)


def _to_login(request: Request) -> RedirectResponse:
    target = request.url.path if request.method == "GET" else f"{PREFIX}/"
    return RedirectResponse(f"{PREFIX}/login?next={quote(target)}", 303)


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


async def _form(request: Request) -> dict[str, str]:
    raw = await request.body()
    if len(raw) > MAX_FORM_BYTES:
        raise ConfigError(f"form of {len(raw)} bytes: at most {MAX_FORM_BYTES}")
    return {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}


class Dashboard:
    """The dashboard of one fleet app."""

    def __init__(self, signer: SessionSigner) -> None:
        self.signer = signer

    def _session(self, ctx: FleetContext, cookie: str | None) -> tuple[Operator, Session]:
        session = self.signer.check(cookie)
        with ctx.db.read() as conn:
            return session_operator(conn, session), session

    async def _signed_in(self, request: Request) -> tuple[Operator, Session] | None:
        ctx = fleet_context(request)
        try:
            return await run_in_threadpool(self._session, ctx, request.cookies.get(COOKIE))
        except AuthenticationError:
            return None

    @staticmethod
    async def _refuse(request: Request, op: Operator, exc: EdgeOSError) -> None:
        ctx = fleet_context(request)
        await run_in_threadpool(
            audit_refusal, ctx.db, actor=op.actor, action="authorize",
            target=f"{request.method} {request.url.path}", detail=str(exc),
        )  # fmt: skip

    def view(self, scope: str, render: Callable[..., pages.Page]) -> Handler:
        """A page that needs ``scope``; ``render(conn, op, csrf, **path_params)``."""

        async def handle(request: Request) -> Response:
            found = await self._signed_in(request)
            if found is None:
                return _to_login(request)
            op, session = found
            if scope not in op.scopes:
                refusal = PermissionDeniedError(
                    f"operator {op.name} lacks the {scope!r} scope for {request.url.path}"
                )
                await self._refuse(request, op, refusal)
                return _error_page(refusal, op, session.csrf)
            ctx = fleet_context(request)
            extra: dict[str, Any] = dict(request.path_params)
            if render in (pages.overview, pages.device):
                extra.update(interval_s=ctx.config.sync_interval_s, db=ctx.db)

            def read() -> pages.Page:
                with ctx.db.read() as conn:
                    return render(conn, op, session.csrf, **extra)

            try:
                title, body = await run_in_threadpool(read)
            except EdgeOSError as exc:
                return _error_page(exc, op, session.csrf)
            return _html(page(title, body, op, session.csrf))

        return handle

    def action(
        self,
        scope: str,
        work: Callable[[FleetContext, Operator, dict[str, str], dict[str, Any]], str],
    ) -> Handler:
        """A form that changes something: session, same origin, CSRF secret, ``scope``;
        then ``work`` (blocking) returns where to go next."""

        async def handle(request: Request) -> Response:
            found = await self._signed_in(request)
            if found is None:
                return _to_login(request)
            op, session = found
            try:
                form = await _form(request)
                origin = request.headers.get("origin")
                if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
                    raise PermissionDeniedError(f"a form posted from another origin ({origin})")
                if not same_secret(form.get("csrf"), session.csrf):
                    raise PermissionDeniedError(
                        "the form's CSRF token is missing or wrong: reload the page and try again"
                    )
                if scope not in op.scopes:
                    raise PermissionDeniedError(
                        f"operator {op.name} lacks the {scope!r} scope for {request.url.path}"
                    )
            except EdgeOSError as exc:
                await self._refuse(request, op, exc)
                return _error_page(exc, op, session.csrf)
            ctx = fleet_context(request)
            try:
                target = await run_in_threadpool(work, ctx, op, form, dict(request.path_params))
            except EdgeOSError as exc:  # audited by the function that refused
                return _error_page(exc, op, session.csrf)
            return RedirectResponse(target, 303)

        return handle

    # -- signing in and out

    async def login_page(self, request: Request) -> Response:
        if await self._signed_in(request) is not None:
            return RedirectResponse(f"{PREFIX}/", 303)
        return self._login_form(request, "")

    def _login_form(self, request: Request, error: str, status: int = 200) -> Response:
        nonce = secrets.token_urlsafe(24)
        next_path = request.query_params.get("next", "")
        message = f'<p class="error">{esc(error)}</p>' if error else ""
        body = (
            f'{message}<form method="post" action="{PREFIX}/login" class="login">'
            f'<input type="hidden" name="csrf" value="{esc(nonce)}">'
            f'<input type="hidden" name="next" value="{esc(next_path)}">'
            '<label for="token">Operator token</label>'
            '<input id="token" type="password" name="token" autocomplete="off" required>'
            '<button type="submit" class="primary">Sign in</button></form>'
            '<p class="muted">Make one with <code>edgeos fleet token create NAME --scope read</code>.</p>'
        )
        response = _html(page("Sign in", body), status)
        response.set_cookie(LOGIN_COOKIE, nonce, max_age=600, path=f"{PREFIX}/login",
                            httponly=True, samesite="strict", secure=_secure(request))  # fmt: skip
        return response

    async def login(self, request: Request) -> Response:
        ctx = fleet_context(request)
        try:
            form = await _form(request)
        except EdgeOSError as exc:
            return self._login_form(request, str(exc), exc.http_status)
        if not same_secret(form.get("csrf"), request.cookies.get(LOGIN_COOKIE) or "\0"):
            refusal = PermissionDeniedError("the sign-in form's CSRF token is missing or wrong")
            await run_in_threadpool(
                audit_refusal, ctx.db, actor="anonymous", action="dashboard.login",
                target=f"POST {PREFIX}/login", detail=str(refusal),
            )  # fmt: skip
            return self._login_form(request, "The form expired: try again.", 403)
        token = form.get("token", "").strip()
        try:
            op = await run_in_threadpool(
                check_operator, ctx, f"Bearer {token}", "read", f"POST {PREFIX}/login"
            )  # audited there when refused
        except EdgeOSError as exc:
            return self._login_form(request, str(exc), exc.http_status)
        _, cookie = self.signer.issue(op.id)

        def record() -> None:
            with ctx.db.begin() as conn:
                write_audit(conn, actor=op.actor, action="dashboard.login",
                            target=f"token/{op.id}", outcome="ok")  # fmt: skip

        await run_in_threadpool(record)
        next_path = form.get("next", "")
        # Only a page of the dashboard: never an open redirect.
        target = (
            next_path
            if next_path.startswith(f"{PREFIX}/") and "//" not in next_path
            else f"{PREFIX}/"
        )
        response = RedirectResponse(target, 303)
        response.set_cookie(COOKIE, cookie, max_age=int(SESSION_TTL_S), path=PREFIX,
                            httponly=True, samesite="strict", secure=_secure(request))  # fmt: skip
        response.delete_cookie(LOGIN_COOKIE, path=f"{PREFIX}/login")
        return response

    @staticmethod
    def logout(
        ctx: FleetContext, op: Operator, form: dict[str, str], params: dict[str, Any]
    ) -> str:
        """Where to go after signing out (the cookie is cleared by the route)."""
        return f"{PREFIX}/login"


# -- what the forms do (blocking; each refusal is audited by the function it calls)


def _answer(ctx: FleetContext, op: Operator, form: dict[str, str], params: dict[str, Any]) -> str:
    device_id, escalation_id = form.get("device_id", ""), form.get("escalation_id", "")
    note = form.get("note") or None
    answer_as(ctx, op, device_id, escalation_id, form.get("choice", ""), note)
    return url("approvals")


def _steer(engine: RolloutEngine, name: str) -> Callable[..., str]:
    act = {"pause": engine.pause, "resume": engine.resume, "abort": engine.abort}[name]

    def work(ctx: FleetContext, op: Operator, form: dict[str, str], params: dict[str, Any]) -> str:
        act(params["rollout_id"], op.actor)
        return url("rollouts", params["rollout_id"])

    return work


def dashboard_routes(keys_dir: Path, engine: RolloutEngine) -> list[BaseRoute]:
    """Every route of the dashboard, under ``/ui``."""
    ui = Dashboard(SessionSigner.from_keys(keys_dir))
    logout = ui.action("read", Dashboard.logout)

    async def sign_out(request: Request) -> Response:
        response = await logout(request)
        if response.status_code == 303:
            response.delete_cookie(COOKIE, path=PREFIX)
        return response

    async def home(request: Request) -> Response:
        return RedirectResponse(f"{PREFIX}/", 307)

    return [
        Route(PREFIX, home, methods=["GET"]),
        Route(f"{PREFIX}/", ui.view("read", pages.overview), methods=["GET"]),
        Route(f"{PREFIX}/login", ui.login_page, methods=["GET"]),
        Route(f"{PREFIX}/login", ui.login, methods=["POST"]),
        Route(f"{PREFIX}/logout", sign_out, methods=["POST"]),
        Route(f"{PREFIX}/devices/{{device_id}}", ui.view("read", pages.device), methods=["GET"]),
        Route(f"{PREFIX}/devices/{{device_id}}/runs/{{run_id}}", ui.view("read", runs.run_page),
              methods=["GET"]),
        Route(f"{PREFIX}/approvals", ui.view("read", pages.approvals_inbox), methods=["GET"]),
        Route(f"{PREFIX}/approvals/answer", ui.action("deploy", _answer), methods=["POST"]),
        Route(f"{PREFIX}/rollouts", ui.view("read", pages.rollouts), methods=["GET"]),
        Route(f"{PREFIX}/rollouts/{{rollout_id}}", ui.view("read", pages.rollout), methods=["GET"]),
        *(
            Route(f"{PREFIX}/rollouts/{{rollout_id}}/{name}", ui.action("deploy", _steer(engine, name)),
                  methods=["POST"])
            for name in ("pause", "resume", "abort")
        ),
        Route(f"{PREFIX}/artifacts", ui.view("read", pages.artifacts), methods=["GET"]),
        Route(f"{PREFIX}/audit", ui.view("admin", pages.audit), methods=["GET"]),
        Mount(f"{PREFIX}/static", StaticFiles(directory=_STATIC), name="dashboard-static"),
    ]  # fmt: skip
