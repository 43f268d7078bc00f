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


class IdleThreadPool(Executor):
    """At most ``max_workers`` threads, started as work comes, each ending after
    ``idle_seconds`` without any."""

    def __init__(
        self, max_workers: int, *, thread_name_prefix: str, idle_seconds: float = IDLE_SECONDS
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"a pool needs at least one thread, not {max_workers}")
        self.max_workers = max_workers
        self.idle_seconds = idle_seconds
        self._prefix = thread_name_prefix
        self._cond = threading.Condition(threading.Lock())
        self._work: deque[_Work] = deque()
        self._threads: set[threading.Thread] = set()
        self._waiting = 0  # threads waiting for work (a woken one counts until it runs)
        self._started = 0
        self._shut = False

    @property
    def thread_count(self) -> int:
        """Threads alive now."""
        with self._cond:
            return len(self._threads)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on a thread of the pool; its future."""
        future: Future[T] = Future()
        with self._cond:
            if self._shut:
                raise RuntimeError("cannot schedule new work after the pool was shut down")
            self._work.append((future, fn, args, kwargs))
            # Each waiting thread takes one piece of work; beyond them, a new thread.
            if len(self._work) > self._waiting and len(self._threads) < self.max_workers:
                self._started += 1
                thread = threading.Thread(
                    target=self._serve, name=f"{self._prefix}_{self._started}", daemon=True
                )
                self._threads.add(thread)
                thread.start()
            else:
                self._cond.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more work; with ``cancel_futures`` work not started is cancelled (else it
        still runs); with ``wait`` this returns once the threads have ended."""
        with self._cond:
            self._shut = True
            if cancel_futures:
                while self._work:
                    self._work.popleft()[0].cancel()
            self._cond.notify_all()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()

    def _next(self) -> _Work | None:
        """The next piece of work, or None when this thread is to end."""
        me = threading.current_thread()
        with self._cond:
            while not self._work:
                if self._shut:
                    self._threads.discard(me)
                    return None
                self._waiting += 1
                woken = self._cond.wait(self.idle_seconds)
                self._waiting -= 1
                if not woken and not self._work:
                    self._threads.discard(me)
                    return None
            return self._work.popleft()

    def _serve(self) -> None:
        while (work := self._next()) is not None:
            future, fn, args, kwargs = work
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # the caller gets it from the future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del work, future, fn, args, kwargs  # nothing of it stays alive while idle
