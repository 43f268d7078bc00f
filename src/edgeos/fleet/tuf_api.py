"""The fleet's TUF repository over HTTP: ``GET /tuf/metadata/{file}``, ``GET /tuf/targets/{path}``.

Only enrolled devices may read it: every request passes the fleet's device check first.
Errors are :class:`edgeos.errors.EdgeOSError` subclasses, turned into JSON by the app's
error handler; a file that does not exist is a 404, which is how a TUF client learns that
it has the newest root.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeos.fleet.tuf_repo import TufRepository

TUF_PREFIX = "/tuf"
"""Where the repository is served; the node's TUF client uses the same paths."""

# Versioned files never change once published; the unversioned ones (timestamp.json,
# root.json) change at every publish and every re-signing, so nothing may keep them.
_IMMUTABLE = "private, max-age=31536000, immutable"
_FRESH = "no-store"


def tuf_routes(
    repo_factory: Callable[[], TufRepository],
    authorize: Callable[[Request], Awaitable[object]],
) -> list[Route]:
    """The two read-only routes of the TUF repository.

    ``repo_factory`` gives the repository to read (called per request, in a worker
    thread, since the store is synchronous); ``authorize`` is awaited first and raises
    to refuse the caller.
    """

    async def metadata(request: Request) -> Response:
        await authorize(request)
        name: str = request.path_params["file"]
        data = await run_in_threadpool(lambda: repo_factory().metadata_file(name))
        versioned = name.split(".", 1)[0].isdigit()
        return Response(
            data,
            media_type="application/json",
            headers={"Cache-Control": _IMMUTABLE if versioned else _FRESH},
        )

    async def target(request: Request) -> Response:
        await authorize(request)
        path: str = request.path_params["path"]
        data = await run_in_threadpool(lambda: repo_factory().target_file(path))
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"Cache-Control": _IMMUTABLE},
        )

    return [
        Route(f"{TUF_PREFIX}/metadata/{{file}}", metadata, methods=["GET"]),
        Route(f"{TUF_PREFIX}/targets/{{path:path}}", target, methods=["GET"]),
    ]
