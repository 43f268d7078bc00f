"""A thread pool whose threads end when they have had nothing to do for a while.

:class:`concurrent.futures.ThreadPoolExecutor` starts threads as work comes and keeps every
one it ever started: an agent that once had 32 runs blocked on a hanging link keeps 32
idle threads for the node's life, and so does each venue and each model host. Here a
thread that waited ``idle_seconds`` for work ends, and a later burst starts threads again
(as Java's pools do with their keep-alive time). The threads are daemons: a step that
never returns cannot hold the process at exit, where the journal, not the thread, is
what resumes the run.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: How long a thread waits for work before it ends.
IDLE_SECONDS = 60.0

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
#: An idle thread's inbox: work handed to it, or None to end.
_Inbox = queue.SimpleQueue[_Work | None]


class IdleThreadPool(Executor):
    """At most ``max_workers`` threads, started as work comes, each ending after
    ``idle_seconds`` without any.

    Work goes straight to an idle thread's own inbox (the one idle the shortest time, so
    the others can reach their end), else to a new thread, else waits in a backlog that
    threads take from before they go idle. Each thread's state changes under one lock, so
    no work is ever left with no thread to take it.
    """

    def __init__(
        self, max_workers: int, *, thread_name_prefix: str, idle_seconds: float = IDLE_SECONDS
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"a pool needs at least one thread, not {max_workers}")
        self.max_workers = max_workers
        self.idle_seconds = idle_seconds
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._idle: list[_Inbox] = []  # a stack: the last to go idle is handed work first
        self._backlog: deque[_Work] = deque()
        self._threads: set[threading.Thread] = set()
        self._started = 0
        self._shut = False

    @property
    def thread_count(self) -> int:
        """Threads alive now."""
        with self._lock:
            return len(self._threads)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on a thread of the pool; its future."""
        future: Future[T] = Future()
        work: _Work = (future, fn, args, kwargs)
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new work after the pool was shut down")
            if self._idle:
                self._idle.pop().put(work)
            elif len(self._threads) < self.max_workers:
                self._started += 1
                thread = threading.Thread(
                    target=self._serve, args=(work,), name=f"{self._prefix}_{self._started}",
                    daemon=True,
                )  # fmt: skip
                self._threads.add(thread)
                thread.start()
            else:
                self._backlog.append(work)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more work; with ``cancel_futures`` work not started is cancelled (else it
        still runs); with ``wait`` this returns once the threads have ended."""
        with self._lock:
            self._shut = True
            if cancel_futures:
                while self._backlog:
                    self._backlog.popleft()[0].cancel()
            for inbox in self._idle:
                inbox.put(None)
            self._idle.clear()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()

    def _serve(self, first: _Work) -> None:
        inbox: _Inbox = queue.SimpleQueue()
        work: _Work | None = first
        try:
            while work is not None:
                future, fn, args, kwargs = work
                if not future.set_running_or_notify_cancel():
                    work = self._next(inbox)
                    continue
                try:
                    result, error = fn(*args, **kwargs), None
                except BaseException as exc:  # the caller gets it from the future
                    result, error = None, exc
                # Idle (or on to the backlog) before the caller hears: work it sends on
                # hearing finds this thread instead of starting another.
                taken, idle = self._after(inbox)
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
                del work, future, fn, args, kwargs, result, error  # nothing kept while idle
                work = taken if not idle else self._wait(inbox)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _next(self, inbox: _Inbox) -> _Work | None:
        """The next piece of work for this thread, or None when it is to end."""
        taken, idle = self._after(inbox)
        return taken if not idle else self._wait(inbox)

    def _after(self, inbox: _Inbox) -> tuple[_Work | None, bool]:
        """(work from the backlog, False), or (None, True) once this thread is listed as
        idle, or (None, False) when the pool is shut down."""
        with self._lock:
            if self._backlog:
                return self._backlog.popleft(), False
            if self._shut:
                return None, False
            self._idle.append(inbox)
            return None, True

    def _wait(self, inbox: _Inbox) -> _Work | None:
        """Work handed to this idle thread, or None when it is to end."""
        try:
            return inbox.get(timeout=self.idle_seconds)
        except queue.Empty:
            with self._lock:
                if any(idle is inbox for idle in self._idle):  # handed nothing: it ends
                    self._idle.remove(inbox)
                    return None
            # Handed work as it timed out: submit put it in under the lock, so it is there.
            return inbox.get_nowait()
