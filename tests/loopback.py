"""HTTP servers on loopback for tests: the services a node talks to (APIs, webhooks,
collectors, fleets), each serving from its own thread from creation until ``stop()``."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn


class LoopbackServer(ThreadingHTTPServer):
    """A threading HTTP server on 127.0.0.1 (``port`` 0: any free one), already serving.

    Subclasses set their own state after ``super().__init__``: nothing can reach the
    server before the test reads its address.
    """

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), handler)
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        """Stop serving and free the port."""
        self.shutdown()
        self.server_close()
        self._thread.join(5)


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that keeps the access log out of the test output."""

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


class UvicornThread:
    """A uvicorn server for ``config`` (on ``sockets`` when given), serving from a thread of
    this process, on the event loop its configuration picks, once ``started``."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        sockets: list[socket.socket] | None = None,
        name: str = "uvicorn",
        timeout: float = 30.0,
    ) -> None:
        import uvicorn

        self.server = uvicorn.Server(config)
        #: The server's event loop, once it runs.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, args=(sockets,), name=name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.01)

    def _run(self, sockets: list[socket.socket] | None) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=sockets)
            # A connection its peer closed just before the shutdown (a TLS handshake, which
            # uvicorn does not track yet) closes in the loop's next turns; a loop closed
            # with it still open fails (uvloop: EBUSY) and warns of the transport.
            await asyncio.sleep(0.1)

        with asyncio.Runner(loop_factory=self.server.config.get_loop_factory()) as runner:
            runner.run(serve())

    @property
    def alive(self) -> bool:
        """Whether the server's thread still runs."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down gracefully and wait for its thread."""
        self.server.should_exit = True
        self._thread.join(timeout)
