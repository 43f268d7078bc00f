"""A small base for the demo's helpers that work in a background thread until stopped."""

from __future__ import annotations

import threading
from typing import Self


class BackgroundThread:
    """``start()`` runs ``_loop`` in a daemon thread; ``stop()`` sets ``_stop`` and joins it.

    ``_loop`` must return soon after ``self._stop`` is set (wait on it, don't sleep).
    """

    thread_name = "background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Start the background thread (once)."""
        if self._thread is not None:
            raise RuntimeError(f"{self.thread_name} is already started")
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and wait for the thread. Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def running(self) -> bool:
        """True while the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        raise NotImplementedError
