"""HTTP servers on loopback for tests: the services a node talks to (APIs, webhooks,
collectors), each serving from its own thread from creation until ``stop()``."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


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
