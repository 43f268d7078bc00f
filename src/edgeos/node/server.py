"""Uvicorn's server, woken by events rather than a 10 Hz poll.

Uvicorn's main loop sleeps 0.1 s at a time to notice a shutdown request and refresh the
``Date`` header: ten wake-ups a second on a node that has nothing to do. Here the loop
sleeps until a signal asks it to stop, waking once a second only for the header (which
has one-second resolution anyway). Shutdown is as prompt as before: the signal handler
sets the event the loop waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import FrameType

import uvicorn

# How often the Date header and uvicorn's other once-a-second duties are refreshed.
TICK_SECONDS = 1.0

# Uvicorn's tick counter advances ten times a second; its once-a-second work runs when the
# counter is a multiple of this.
_UVICORN_TICKS_PER_SECOND = 10


class NodeServer(uvicorn.Server):
    """A uvicorn server whose main loop waits on an event instead of polling."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._exit_requested: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        """Run until asked to stop, refreshing the default headers once a second."""
        self._loop = asyncio.get_running_loop()
        self._exit_requested = asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit_requested.wait(), TICK_SECONDS)
            counter = (counter + _UVICORN_TICKS_PER_SECOND) % 864_000
            should_exit = await self.on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Uvicorn's handling of SIGINT and SIGTERM, then wake the main loop at once."""
        super().handle_exit(sig, frame)
        if self._loop is not None and self._exit_requested is not None:
            # Runs in a Python signal handler: hand the wake-up to the loop, thread-safely.
            self._loop.call_soon_threadsafe(self._exit_requested.set)
