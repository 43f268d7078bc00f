"""Group commit: one writer thread commits the writes of many concurrent runs together.

With ``synchronous=FULL`` every commit waits for the disk; a durable executor that
commits each step on its own is capped at a few thousand steps a second. Here each
caller hands over a function that writes inside a SAVEPOINT; the writer runs every
function queued so far in one transaction, commits once, and only then tells each caller
it is durable. A caller still never proceeds before its write is on disk.

When the disk refuses the group (full, or failing), every caller in it gets a
:class:`~edgeos.state.database.DiskFullError` (retryable) and nothing of the group is in
the file; the writer goes on with the next group.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from edgeos.errors import UnavailableError
from edgeos.state.database import Database, is_storage_error

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], T]


@dataclass
class _Job(Generic[T]):
    fn: WriteFn[T]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]


class GroupWriter:
    """Serialises writes through one thread and commits them in groups."""

    def __init__(self, db: Database, *, max_group: int = 256) -> None:
        self.db = db
        self.max_group = max_group
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.groups = 0
        self.writes = 0

    def start(self) -> GroupWriter:
        """Start the writer thread. Idempotent."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edgeos-writer", daemon=True)
            self._thread.start()
        return self

    async def write(self, fn: WriteFn[T]) -> T:
        """Run ``fn(conn)`` in the next group; returns its result once committed."""
        if self._thread is None:
            raise UnavailableError("the database writer is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, loop, future))
        return await future

    def stop(self) -> None:
        """Commit what is queued, then stop the thread. Safe to call twice."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            group = [job]
            stop = False
            while len(group) < self.max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            self._commit(group)
            if stop:
                return

    def _commit(self, group: list[_Job[Any]]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self.db.transaction() as group_conn:
                for job in group:
                    try:
                        with self.db.transaction() as conn:  # a SAVEPOINT per job
                            outcomes.append((True, job.fn(conn)))
                    except Exception as exc:  # the job's own failure, rolled back alone
                        if is_storage_error(exc) or not group_conn.in_transaction:
                            # The disk failed, not the job: SQLite may have rolled the whole
                            # group back already, and the next job would run outside any
                            # transaction. Fail the group; Database turns this into a
                            # retryable DiskFullError.
                            raise
                        outcomes.append((False, exc))
        except Exception as exc:  # the commit itself failed: nothing in the group is durable
            outcomes = [(False, exc)] * len(group)
        self.groups += 1
        self.writes += len(group)
        # One wake-up per event loop for the whole group, not one per caller: waking a loop
        # costs a write to its socket and a wait for the GIL each time.
        settled: dict[asyncio.AbstractEventLoop, list[_Settled]] = {}
        for job, (ok, value) in zip(group, outcomes, strict=True):
            settled.setdefault(job.loop, []).append((job.future, ok, value))
        for loop, batch in settled.items():
            # A loop closed meanwhile has no one left waiting; the writer goes on.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, batch)


_Settled = tuple["asyncio.Future[Any]", bool, Any]


def _settle(batch: list[_Settled]) -> None:
    for future, ok, value in batch:
        if future.done():  # its caller was cancelled
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
