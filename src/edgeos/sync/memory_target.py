"""The fleet's memory backup as this node's replication target, and the task that ships to it.

:class:`FleetTarget` speaks the fleet's ``/api/v1/memory/...`` endpoints over the
device's mTLS client, implementing :class:`edgeos.memory.replication.ReplicationTarget`:
the fleet keeps the position and applies each batch idempotently by sequence, so the
change log's guarantees hold over the network too: a round cut off anywhere (the fleet
stopped, the link lost, an answer that never came back) resumes where the fleet says,
and nothing is applied twice.

:class:`MemoryReplicator` runs beside the sync loop. Its first round of a node's life
asks the fleet where the backup stands and whether this device was enrolled to replace
another; if so, and that device's memory was not restored here yet, it restores it
(records with their vectors and metadata, which then join this node's own change log).
Once its own backup holds them, it lets the fleet drop the replaced device's copy (the
memory moved: an erasure here must not leave a copy there), and gives the restored
records their filter rows as the fleet deploys their agents. Then, every interval, it
ships the changes the fleet lacks, asking the fleet only when the log has moved past
what the fleet was last known to hold (and every ``recheck_s`` in any case, in case the
fleet lost some).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import orjson
from pydantic import BaseModel

from edgeos.errors import InvalidRequestError, VerificationError
from edgeos.memory import replication
from edgeos.memory.replication import Change
from edgeos.protocol.fleet import (
    API,
    MAX_MEMORY_BATCH_BYTES,
    MAX_MEMORY_BATCH_CHANGES,
    MemoryBackup,
    MemoryRecordsPage,
)
from edgeos.retry import backoff_delay
from edgeos.state import Database
from edgeos.sync import state
from edgeos.sync.client import fleet_client, parse_answer, transport_error
from edgeos.sync.identity import FleetPaths, Identity
from edgeos.sync.link import REFUSED
from edgeos.sync.source import in_daemon_thread

if TYPE_CHECKING:
    from edgeos.sync.loop import SyncLoop

log = logging.getLogger("edgeos.sync")

M = TypeVar("M", bound=BaseModel)

#: The target's name in ``memory_replicas`` (``fleet:DEVICE``).
TARGET = "fleet"
#: The ``fleet_state`` key that says whose memory was restored here.
RESTORED = "memory_restored"
_JSON = {"content-type": "application/json"}


class FleetTarget:
    """The fleet's memory backups, through ``http`` (an mTLS client of the fleet)."""

    name = TARGET

    def __init__(
        self,
        http: httpx.Client,
        *,
        max_bytes: int = MAX_MEMORY_BATCH_BYTES,
        max_changes: int = MAX_MEMORY_BATCH_CHANGES,
    ) -> None:
        self.http, self.max_bytes, self.max_changes = http, max_bytes, max_changes

    def backup(self, node: str) -> MemoryBackup:
        """Where ``node``'s backup stands, and whom ``node`` replaces."""
        return self._call("GET", f"{API}/memory/{node}", MemoryBackup, "the memory position")

    def position(self, node: str) -> int:
        """The last sequence of ``node``'s log the fleet applied."""
        return self.backup(node).position

    def apply(self, node: str, changes: Sequence[Change]) -> int:
        """Ship ``changes`` in as many requests as the fleet's limits need; the position."""
        position = 0
        for body, last in self._batches(changes):
            answer = self._call("POST", f"{API}/memory/{node}/changes", MemoryBackup,
                                "a memory batch", content=body, headers=_JSON)  # fmt: skip
            if answer.position < last:
                raise VerificationError(
                    f"the fleet's memory backup stands at {answer.position} after a batch "
                    f"up to {last}"
                )
            position = answer.position
        return position

    def release(self, node: str) -> MemoryBackup:
        """Let the fleet drop the records of ``node``, which this device replaces and whose
        records it restored and backed up as its own."""
        return self._call("DELETE", f"{API}/memory/{node}", MemoryBackup, "the release")

    def records(self, node: str) -> Iterator[dict[str, Any]]:
        """``node``'s live records as the fleet holds them, a page at a time."""
        after: str | None = None
        while True:
            params = {"after": after} if after else {}
            page = self._call("GET", f"{API}/memory/{node}/records", MemoryRecordsPage,
                              "the memory records", params=params)  # fmt: skip
            for record in page.records:
                yield record.model_dump()
            if page.next is None:
                return
            after = page.next

    def _batches(self, changes: Sequence[Change]) -> Iterator[tuple[bytes, int]]:
        """Request bodies of at most ``max_bytes`` and ``max_changes``, with each one's
        last sequence."""
        room = self.max_bytes - len(b'{"changes":[]}')
        parts: list[bytes] = []
        size, last = 0, 0
        for change in changes:
            part = orjson.dumps(change.to_json())
            if len(part) > room:
                raise InvalidRequestError(
                    f"memory change {change.seq} (record {change.record}) is {len(part)} "
                    f"bytes: more than the fleet takes in a batch ({self.max_bytes})"
                )
            if parts and (size + len(part) + 1 > room or len(parts) >= self.max_changes):
                yield b'{"changes":[' + b",".join(parts) + b"]}", last
                parts, size = [], 0
            parts.append(part)
            size, last = size + len(part) + 1, change.seq
        if parts:
            yield b'{"changes":[' + b",".join(parts) + b"]}", last

    def _call(self, method: str, path: str, model: type[M], what: str, **kwargs: Any) -> M:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(exc, str(self.http.base_url), what) from exc
        return parse_answer(response, model, what)


class MemoryReplicator:
    """Replicates this node's memory to its fleet, and restores a replaced device's.

    ``identity`` gives the device's identity (None before enrollment, or while the fleet
    refuses it); ``url`` the fleet's URL for it.
    """

    def __init__(
        self,
        db: Database,
        data_dir: Path,
        identity: Callable[[], Identity | None],
        url: Callable[[Identity], str],
        *,
        interval_s: float = 30.0,
        recheck_s: float = 600.0,
        timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db, self.paths = db, FleetPaths.of(data_dir)
        self.identity, self.url, self.clock = identity, url, clock
        self.interval_s, self.recheck_s, self.timeout_s = interval_s, recheck_s, timeout_s
        self.checked_at: float | None = None  # when the fleet was last asked, this life
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy: asyncio.Future[Any] | None = None

    @classmethod
    def beside(cls, loop: SyncLoop, **options: Any) -> MemoryReplicator:
        """A replicator following ``loop``'s identity and fleet URL, resting while the
        fleet refuses the device (revoked, certificate expired)."""

        def identity() -> Identity | None:
            return None if loop.link.state in REFUSED else loop.identity

        return cls(loop.db, loop.data_dir, identity, lambda i: loop.fleet_url or i.url, **options)

    async def start(self) -> None:
        """Start replicating in the background."""
        self._task = asyncio.get_running_loop().create_task(self.run(), name="edgeos-memory")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop; a round under way gets ``grace`` seconds to finish. Safe to repeat."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._busy is not None and not self._busy.done():
            await asyncio.wait({self._busy}, timeout=grace)

    async def run(self) -> None:
        """Replicate until cancelled; a failure is logged and tried again with backoff."""
        failures = 0
        while True:
            identity = self.identity()
            delay = min(self.interval_s, 1.0)  # not enrolled yet: look again soon
            if identity is not None:
                work = partial(self.replicate, identity)
                self._busy = in_daemon_thread(work, "edgeos-memory")
                try:
                    await asyncio.shield(self._busy)
                    failures, delay, self.last_error = 0, self.interval_s, None
                except Exception as exc:  # a fleet problem must never stop the node
                    failures += 1
                    if failures == 1:
                        log.warning("memory replication failed, retrying with backoff: %s", exc)
                    self.last_error = str(exc)
                    delay = backoff_delay(failures, base=1.0, cap=max(self.interval_s, 60.0))
            await asyncio.sleep(delay)

    def replicate(self, identity: Identity) -> replication.Synced | None:
        """One round (blocking): restore a replaced device's memory once, then ship what
        the fleet lacks; None when there was nothing to ask the fleet."""
        me, now = identity.device_id, self.clock()
        self._index_restored()
        ask = self.checked_at is None or (
            now - self.checked_at >= self.recheck_s and replication.last_seq(self.db) > 0
        )
        if not ask and not replication.behind(self.db, TARGET, me):
            return None
        paths = self.paths
        with fleet_client(self.url(identity), paths.ca.read_text(), cert=paths.cert,
                          key=paths.key, timeout=self.timeout_s) as http:  # fmt: skip
            target = FleetTarget(http)
            if self.checked_at is None:
                self._restore_replaced(target, target.backup(me).replaces)
            synced = replication.sync(self.db, target, me)
            self._release_replaced(target)
        self.checked_at = now
        return synced

    def restored(self) -> dict[str, Any] | None:
        """Whose memory was restored here, how many records, and how far it went."""
        done = state.get_value(self.db, RESTORED)
        return done if isinstance(done, dict) else None

    def _note(self, **facts: Any) -> None:
        state.set_value(self.db, RESTORED, {**(self.restored() or {}), **facts})

    def _restore_replaced(self, target: FleetTarget, replaces: str | None) -> None:
        done = self.restored()
        if replaces is None or (done is not None and done.get("from") == replaces):
            return
        written = replication.restore(self.db, target, replaces)
        log.info("restored %d memory record(s) of device %s, which this one replaces",
                 written, replaces)  # fmt: skip
        state.set_value(self.db, RESTORED, {
            "from": replaces, "records": written, "at": self.clock(), "released": False,
            "unindexed": replication.agents_not_installed(self.db),
        })  # fmt: skip
        self._index_restored()

    def _release_replaced(self, target: FleetTarget) -> None:
        """Once this device's own backup holds the restored records (the sync before
        this succeeded), the replaced device's backup lets them go."""
        done = self.restored()
        if done is not None and not done.get("released"):
            target.release(done["from"])
            self._note(released=True)

    def _index_restored(self) -> None:
        """Filter rows for restored records whose agents the fleet has deployed since."""
        done = self.restored()
        waiting = list(done.get("unindexed") or []) if done is not None else []
        if waiting:
            missing = replication.index_fields(self.db, waiting)
            if missing != waiting:
                self._note(unindexed=missing)
