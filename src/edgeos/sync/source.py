"""Artifacts from the fleet's TUF repository, and running blocking work off the event loop.

:class:`TufSource` is the :class:`edgeos.sync.apply.ArtifactSource` of a real node: it
refreshes the TUF metadata once per pass and downloads each target, refusing one whose
signed custom metadata names another artifact than the desired state says.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from edgeos.errors import UnavailableError, VerificationError
from edgeos.protocol.fleet import DesiredArtifact

if TYPE_CHECKING:
    from edgeos.sync.apply import Applier, Outcome
    from edgeos.sync.identity import FleetPaths
    from edgeos.sync.tuf_client import TufClient

T = TypeVar("T")


class TufSource:
    """Verified artifact bytes from the fleet, for one apply pass."""

    def __init__(self, tuf: TufClient) -> None:
        self.tuf = tuf
        self._refreshed = False

    def fetch(self, artifact: DesiredArtifact) -> bytes:
        """The target's bytes, verified against the signed metadata."""
        if not self._refreshed:
            try:
                self.tuf.refresh()
            except VerificationError as exc:
                # Not this artifact's fault: nothing installs until the metadata verifies,
                # and the versions stay pending rather than refused.
                raise UnavailableError(
                    f"the fleet's TUF metadata was refused, nothing is installed: {exc}"
                ) from exc
            self._refreshed = True
        signed = self.tuf.info(artifact.target)
        wanted = {"kind": artifact.kind, "name": artifact.name, "version": artifact.version}
        if any(signed.get(k) != v for k, v in wanted.items()):
            raise VerificationError(
                f"target {artifact.target} is signed as {signed or 'no artifact'}, not as "
                f"{artifact.kind}/{artifact.name}@{artifact.version}"
            )
        return self.tuf.download(artifact.target)


def apply_from_fleet(
    applier: Applier, paths: FleetPaths, url: str, desired: list[DesiredArtifact], timeout: float
) -> list[Outcome]:
    """One apply pass with artifacts from the fleet at ``url`` (blocking: a worker thread's)."""
    from edgeos.sync.client import fleet_client
    from edgeos.sync.tuf_client import TufClient

    ca = paths.ca.read_text()
    with fleet_client(url, ca, cert=paths.cert, key=paths.key, timeout=timeout) as http:
        tuf = TufClient(paths.tuf_metadata, paths.tuf_targets, url, http)
        try:
            return applier.apply(desired, TufSource(tuf))
        finally:  # verified copies: the registry and the agents hold what they need
            shutil.rmtree(paths.tuf_targets, ignore_errors=True)


def in_daemon_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run ``fn`` in a daemon thread; its result or exception arrives in the future.

    A daemon thread, not the loop's executor: a fleet call or a health check still
    running when the node stops must not hold the process's exit (a switch cut off
    there is rolled back at the next start).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(setter: Callable[[], None]) -> None:
        if not future.done():
            setter()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(deliver, lambda: future.set_exception(outcome))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, lambda: future.set_result(result))

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
