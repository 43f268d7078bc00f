"""The outbound queue on a node: an HTTP operation declared ``batch`` hands its effects from
the outbox to the queue, and the node's task sends them in batches when the link is up."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from edgeos.connectors.config import HttpBatch, HttpOperation
from edgeos.connectors.http import HttpConnector, outbound_sender
from edgeos.node.status import collect_status
from edgeos.routing.outbound import Outbound, OutboundQueue
from edgeos.settings import load_settings
from edgeos.state import Database, outbox
from edgeos.telemetry import MetricsRegistry
from tests.loopback import LoopbackServer, QuietHandler


class CloudService(LoopbackServer):
    """A cloud service's batch endpoint on loopback: it applies each batch once (by its
    ``seq``) and each message once (by its key), and counts the requests it was paid for."""

    def __init__(self, port: int) -> None:
        super().__init__(_Handler, port)
        self.requests = 0
        self.seqs: set[int] = set()
        self.applied: Counter[str] = Counter()
        self.priorities: list[str] = []
        self.dropped: Counter[str] = Counter()
        self.lock = threading.Lock()

    def take(self, doc: dict[str, Any]) -> None:
        with self.lock:
            self.requests += 1
            if doc["seq"] in self.seqs:
                return  # the same batch again: its answer was lost
            self.seqs.add(doc["seq"])
            self.dropped.update(doc["dropped"])
            for message in doc["messages"]:
                self.priorities.append(message["priority"])
                key = message["message"]["key"]
                if key not in self.applied:
                    self.applied[key] += 1


class _Handler(QuietHandler):
    server: CloudService

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/reports/batch"
        assert self.headers["Idempotency-Key"]
        self.server.take(orjson.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: A node process: its effects for ``cloud.report`` are written to the outbox as an act
#: step writes them, and it runs until killed.
NODE = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from edgeos.node.daemon import Node
    from edgeos.settings import load_settings
    from edgeos.state import outbox
    from edgeos.state.outbox import OutboxEntry

    async def main(data, count):
        node = Node(load_settings({"data_dir": data}, environ={})).open()
        await node.start()
        if count:
            with node.db.transaction() as conn:
                for i in range(count):
                    entry = OutboxEntry(f"run-1:act:{i}", "run-1", "cloud", "report",
                                        {"i": i, "pad": "x" * 200})
                    outbox.enqueue(conn, entry, at=time.time())
            node._wake()
        print("started", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
    """
)


def node_process(data: Path, count: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", NODE, str(data), str(count)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "started"
    return process


def stop(process: subprocess.Popen[str], sig: signal.Signals) -> None:
    os.kill(process.pid, sig)
    process.wait()
    assert process.stdout is not None
    process.stdout.close()


def handed(data: Path) -> set[str]:
    with Database(data / "node.db") as db:
        return {e.key for e in outbox.entries(db, states=(outbox.DELIVERED,), limit=10_000)}


def wait_for(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_effects_queue_on_disk_survive_sigkill_and_go_in_batches_once(tmp_path: Path) -> None:
    data, port, count = tmp_path / "node", free_port(), 150
    data.mkdir()
    (data / "connectors.yaml").write_text(
        f"cloud:\n  type: http\n  base_url: http://127.0.0.1:{port}\n  operations:\n"
        "    report: {path: /reports, batch: {path: /reports/batch, priority: bulk}}\n"
    )
    # The link is down (nothing listens): the node hands the effects to the queue and is
    # killed while it does.
    first = node_process(data, count)
    try:
        wait_for(lambda: len(handed(data)) >= count // 3)
    finally:
        stop(first, signal.SIGKILL)
    acknowledged = handed(data)
    with Database(data / "node.db") as db:
        status = collect_status(db, load_settings({"data_dir": data}, environ={}))
        reader = db.reader()
        waiting = [orjson.loads(p)["message"] for (p,) in reader.execute(
            "SELECT payload FROM outbound_messages")]  # fmt: skip
        in_flight = [m["message"] for (b,) in reader.execute("SELECT body FROM outbound_batch")
                     for m in orjson.loads(b)["messages"]]  # fmt: skip
    # Every effect the outbox let go of is on disk: waiting, or in the batch the node
    # tried to send while the link was down.
    assert acknowledged <= {m["key"] for m in waiting + in_flight}
    assert status.buffers.outbound.get("bulk", 0) == len(waiting)
    assert status.buffers.outbound.get("in_flight", 0) == len(in_flight)

    # The link is up: a restarted node hands over the rest and sends everything in batches.
    service = CloudService(port)
    second = node_process(data, 0)
    try:
        wait_for(lambda: len(service.applied) == count)
    finally:
        stop(second, signal.SIGTERM)
        service.stop()
    assert set(service.applied) == {f"run-1:act:{i}" for i in range(count)}
    assert set(service.applied.values()) == {1}
    assert service.requests <= count / 15  # 150 messages in a handful of paid requests
    assert handed(data) == set(service.applied)


def test_the_declared_drop_order_applies_when_the_bound_is_hit(tmp_path: Path) -> None:
    port = free_port()
    connector = HttpConnector(
        "cloud", base_url=f"http://127.0.0.1:{port}",
        operations={"report": HttpOperation(path="/r", batch=HttpBatch(path="/reports/batch"))},
    )  # fmt: skip
    metrics = MetricsRegistry()

    async def scenario(db: Database) -> None:
        queue = OutboundQueue(db, max_bytes=8192)
        outbound = Outbound(
            queue, outbound_sender({"cloud": connector}), linger=0.05, max_backoff=0.2,
            metrics=metrics,
        )  # fmt: skip
        connector.outbound = outbound
        # The link is down: each effect handed over waits on disk, and the bulk ones make
        # room for the critical ones when the bound is hit.
        for i in range(40):
            batch = HttpBatch(path="/reports/batch", priority="critical" if i % 4 == 0 else "bulk")
            connector.operations["report"] = HttpOperation(path="/r", batch=batch)
            result = await connector.deliver("report", {"i": i, "pad": "x" * 300}, f"k{i}")
            assert result is not None
            assert result["priority"] == batch.priority
        assert queue.usage().bytes <= 8192
        service = CloudService(port)  # the link is up
        outbound.start()
        try:
            deadline = time.monotonic() + 10
            while queue.usage().records or queue.usage().pending:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            await outbound.stop()
            await connector.close()
            service.stop()
        critical = {f"k{i}" for i in range(0, 40, 4)}
        assert critical <= set(service.applied)  # no critical message was pushed out
        assert len(service.applied) < 40
        assert service.dropped == {"bulk": 40 - len(service.applied)}  # reported with a batch
        assert service.priorities.index("bulk") > service.priorities.index("critical")

    with Database(tmp_path / "node.db") as db:
        asyncio.run(scenario(db))
        text = metrics.render()
    assert 'edgeos_outbound_dropped_total{priority="bulk"}' in text
    assert "edgeos_outbound_requests_total" in text
