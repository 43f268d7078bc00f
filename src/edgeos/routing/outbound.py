"""Messages for cloud services, held on disk while the link is down: bounded, prioritised, batched.

The telemetry uplink's buffer (:class:`edgeos.telemetry.buffer.TelemetryBuffer`) on a
channel of its own (tables ``outbound_messages``, ``outbound_batch``, ``outbound_state``
in the node database), so it keeps the same promises:

- **bounded**: at most ``max_bytes`` of messages (the batch in flight included);
- **priorities** ``critical`` 0, ``normal`` 1, ``bulk`` 2, and a **declared drop order**
  when full, :data:`DROP_ORDER` (bulk, then normal, then critical; oldest first within
  each): a message only pushes out messages as important as itself or less, else it is
  dropped itself. Drops are counted by priority and sent with the next batch;
- **batching**: :meth:`OutboundQueue.flush` sends the most important messages, oldest
  first, up to ``max_batch_bytes`` in one request, so a service priced per request pays
  once per batch instead of once per message. A batch stays until it is acknowledged:
  a send that fails is retried with the same body and sequence number (the receiver
  deduplicates by it), and a SIGKILL between the send and the acknowledgement loses
  nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from edgeos.errors import UnavailableError
from edgeos.telemetry.buffer import BufferUsage, Channel, Record, Store, TelemetryBuffer

#: Each priority of a message: lower numbers are kept longer and sent first.
PRIORITIES: dict[str, int] = {"critical": 0, "normal": 1, "bulk": 2}
OUTBOUND = Channel("outbound_messages", "outbound_batch", "outbound_state", PRIORITIES)
#: The order messages are dropped in when the queue is full.
DROP_ORDER: tuple[str, ...] = OUTBOUND.drop_order

#: Sends one batch body (JSON: ``seq``, ``messages``, ``dropped``) to the cloud;
#: UnavailableError when the link is down (the batch is kept and sent again).
Send = Callable[[bytes], None]


@dataclass(frozen=True)
class Flushed:
    """What one :meth:`OutboundQueue.flush` delivered."""

    messages: int
    requests: int


class OutboundQueue:
    """The node's queue of messages for cloud services; see the module docstring."""

    def __init__(
        self,
        db: Store,
        *,
        max_bytes: int = 16 << 20,
        max_batch_bytes: int = 256 << 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.buffer = TelemetryBuffer(db, max_bytes=max_bytes, clock=clock, channel=OUTBOUND)
        self.max_batch_bytes = max_batch_bytes

    def put(self, service: str, message: Mapping[str, Any], *, priority: str = "normal") -> bool:
        """Queue ``message`` for ``service``; False when it was dropped itself (the queue
        is full of more important messages). ValueError for an unknown priority."""
        return self.buffer.put(priority, {"service": service, "message": dict(message)})

    def flush(self, send: Send) -> Flushed:
        """Send batches until the queue is empty or the link is down."""
        messages = requests = 0
        while True:
            batch = self.buffer.pending() or self.buffer.take_batch(
                _body, max_payload_bytes=self.max_batch_bytes
            )
            if batch is None:
                return Flushed(messages, requests)
            try:
                send(batch.body)
            except UnavailableError:
                return Flushed(messages, requests)
            self.buffer.acknowledge(batch.seq)
            messages += batch.records
            requests += 1

    def usage(self) -> BufferUsage:
        """Messages per priority, bytes held, the batch in flight, drops not yet sent."""
        return self.buffer.usage()


def _body(seq: int, records: list[Record], dropped: dict[str, int]) -> bytes:
    messages = [{"priority": r.kind, "at": r.at, **orjson.loads(r.payload)} for r in records]
    return orjson.dumps({"seq": seq, "messages": messages, "dropped": dropped})
