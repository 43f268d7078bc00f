"""A real HTTP service on loopback that applies effects once per Idempotency-Key.

It stands in for a supplier's ordering API: it records every request it gets, and
applies (counts) an effect only the first time it sees its key, as such APIs do.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """``with Receiver() as r:`` serves on a free loopback port until the block ends."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.applied: dict[str, Any] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if len(raw) != length:  # the sender died mid-request: nothing arrived
                    return
                body = json.loads(raw or b"null")
                key = self.headers.get("Idempotency-Key", "")
                with receiver.lock:
                    receiver.seen[key] += 1
                    receiver.applied.setdefault(key, body)
                reply = json.dumps({"ok": True, "key": key}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
