"""The outbound queue for cloud services: bounded on disk, declared drop order, batched."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgeos.errors import UnavailableError
from edgeos.routing.outbound import DROP_ORDER, OutboundQueue
from edgeos.state import Database


def test_a_full_queue_drops_in_the_declared_order_and_never_pushes_out_more_important(
    tmp_path: Path,
) -> None:
    assert DROP_ORDER == ("bulk", "normal", "critical")
    with Database(tmp_path / "node.db") as db:
        queue = OutboundQueue(db, max_bytes=4096)
        pad = "x" * 300
        for i in range(8):
            assert queue.put("metrics", {"i": i, "pad": pad}, priority="bulk")
        for i in range(8):
            assert queue.put("orders", {"i": i, "pad": pad}, priority="normal")
        for i in range(8):
            assert queue.put("alarms", {"i": i, "pad": pad}, priority="critical")
        usage = queue.usage()
        assert usage.bytes <= 4096
        assert "bulk" not in usage.records  # pushed out first, every one of them
        assert usage.records["critical"] == 8
        assert usage.dropped["bulk"] == 8
        # A bulk message does not push out anything more important: it is dropped itself.
        assert not queue.put("metrics", {"pad": pad}, priority="bulk")
        assert queue.usage().dropped["bulk"] == 9
        with pytest.raises(ValueError, match="record kind 'urgent'"):
            queue.put("alarms", {}, priority="urgent")


def test_batches_cut_requests_survive_a_failed_send_and_a_reopen(tmp_path: Path) -> None:
    sent: list[dict[str, Any]] = []
    link = {"up": False}

    async def send(service: str, body: bytes) -> None:
        if not link["up"]:
            raise UnavailableError("cloud does not answer")
        assert service == "orders"
        sent.append(orjson.loads(body))

    with Database(tmp_path / "node.db") as db:
        queue = OutboundQueue(db, max_batch_bytes=8 << 10)
        for i in range(200):
            queue.put(
                "orders", {"sku": f"sku-{i}", "qty": i}, priority="bulk" if i % 2 else "normal"
            )
        down = asyncio.run(queue.flush(send))
        assert down.messages == 0
        assert down.link_down
        in_flight = queue.usage().pending
        assert in_flight is not None
    with Database(tmp_path / "node.db") as db:  # reopened, as after a restart
        queue = OutboundQueue(db, max_batch_bytes=8 << 10)
        assert queue.usage().pending == in_flight
        link["up"] = True
        flushed = asyncio.run(queue.flush(send))
        assert flushed.messages == 200
        assert flushed.requests < 200 / 10  # at least ten messages per paid request
        assert queue.usage().records == {}
    assert sent[0]["seq"] == in_flight.seq  # the failed batch went again, as it was
    messages = [m for batch in sent for m in batch["messages"]]
    assert sorted(m["message"]["qty"] for m in messages) == list(range(200))
    # The most important first: every normal message went out before any bulk one.
    priorities = [m["priority"] for m in messages]
    assert priorities == sorted(priorities, key=["normal", "bulk"].index)
