"""Messages for cloud services, held on disk while the link is down: bounded, prioritised, batched.

The telemetry uplink's buffer (:class:`edgeos.telemetry.buffer.TelemetryBuffer`) on a
channel of its own (tables ``outbound_messages``, ``outbound_batch``, ``outbound_state``
in the node database), so it keeps the same promises:

- **bounded**: at most ``max_bytes`` of messages (the batch in flight included);
- **priorities** ``critical`` 0, ``normal`` 1, ``bulk`` 2, and a **declared drop order**
  when full, :data:`DROP_ORDER` (bulk, then normal, then critical; oldest first within
  each): a message only pushes out messages as important as itself or less, else it is
  dropped itself. Drops are counted by priority and sent with the next batch;
- **batching**: :meth:`OutboundQueue.flush` takes the most important messages, oldest
  first, up to ``max_batch_bytes``, as one batch with a sequence number, and sends it as
  one request per service it holds messages for, so a service priced per request pays
  once per batch instead of once per message. A batch stays until every service took
  it: a send that fails is retried with the same body and sequence number (the
  receiver deduplicates by it), and a SIGKILL between the send and the acknowledgement
  loses nothing.

On a node, :class:`Outbound` owns the queue and the task that flushes it: a message put
wakes the task, which waits ``linger`` seconds for more to join the batch, then sends;
while the service does not answer (the link is down) it tries again with backoff (new
messages wait for the next try), and :meth:`Outbound.wake` (the link is back) makes it
try at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.errors import EdgeOSError, UnavailableError
from edgeos.retry import backoff_delay
from edgeos.telemetry.buffer import (
    BufferUsage,
    Channel,
    PendingBatch,
    Record,
    Store,
    TelemetryBuffer,
)

if TYPE_CHECKING:
    from edgeos.telemetry import MetricsRegistry
    from edgeos.telemetry.metrics import Counter

log = logging.getLogger("edgeos.routing")

#: Each priority of a message: lower numbers are kept longer and sent first.
PRIORITIES: dict[str, int] = {"critical": 0, "normal": 1, "bulk": 2}
OUTBOUND = Channel("outbound_messages", "outbound_batch", "outbound_state", PRIORITIES)
#: The order messages are dropped in when the queue is full.
DROP_ORDER: tuple[str, ...] = OUTBOUND.drop_order

#: Sends one service's part of a batch (JSON: ``seq``, ``messages``, ``dropped``) to it.
#: UnavailableError when the link is down (the batch is kept and sent again as it was);
#: any other EdgeOSError when the service refuses it for good (it is logged and let go).
Send = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True)
class Flushed:
    """What one :meth:`OutboundQueue.flush` did."""

    messages: int
    requests: int
    #: Messages in batches a service refused for good (logged, not sent again).
    refused: int = 0
    #: The flush stopped at a service that did not answer: a batch is left to send.
    link_down: bool = False
    #: Messages dropped by the declared drop order, by priority, reported with the
    #: batches this flush sent (or let go).
    dropped: Mapping[str, int] = field(default_factory=dict)


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

    async def flush(self, send: Send) -> Flushed:
        """Send batches until the queue is empty or a service does not answer."""
        messages = requests = refused = 0
        dropped: dict[str, int] = {}
        while True:
            batch = await asyncio.to_thread(self._next_batch)
            if batch is None:
                return Flushed(messages, requests, refused, dropped=dropped)
            doc = orjson.loads(batch.body)
            parts = _by_service(doc)
            try:
                for service, body in parts.items():
                    await send(service, body)
            except UnavailableError:
                return Flushed(messages, requests, refused, link_down=True, dropped=dropped)
            except EdgeOSError as exc:
                log.error(
                    "outbound batch %d (%d messages) refused for good: %s",
                    batch.seq, batch.records, exc,
                )  # fmt: skip
                refused += batch.records
            else:
                messages += batch.records
                requests += len(parts)
            await asyncio.to_thread(self.buffer.acknowledge, batch.seq)
            for priority, count in doc["dropped"].items():
                dropped[priority] = dropped.get(priority, 0) + int(count)

    def usage(self) -> BufferUsage:
        """Messages per priority, bytes held, the batch in flight, drops not yet sent."""
        return self.buffer.usage()

    def _next_batch(self) -> PendingBatch | None:
        return self.buffer.pending() or self.buffer.take_batch(
            _body, max_payload_bytes=self.max_batch_bytes
        )


def outbound_waiting(db: Store) -> tuple[dict[str, int], dict[str, int]]:
    """For ``edgeos node status``: messages waiting by priority (``in_flight``: those of
    the batch sent and not yet acknowledged), and drops not yet reported, by priority."""
    usage = OutboundQueue(db).usage()
    waiting = dict(usage.records)
    if usage.pending is not None:
        waiting["in_flight"] = usage.pending.records
    return waiting, dict(usage.dropped)


def _body(seq: int, records: list[Record], dropped: dict[str, int]) -> bytes:
    messages = [{"priority": r.kind, "at": r.at, **orjson.loads(r.payload)} for r in records]
    return orjson.dumps({"seq": seq, "messages": messages, "dropped": dropped})


def _by_service(doc: dict[str, Any]) -> dict[str, bytes]:
    """One body per service in a batch, each with the batch's sequence number and drops
    (a batch of drops alone goes to no service; :class:`Outbound` counts them)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for message in doc["messages"]:
        grouped.setdefault(str(message["service"]), []).append(message)
    return {
        service: orjson.dumps({"seq": doc["seq"], "messages": items, "dropped": doc["dropped"]})
        for service, items in grouped.items()
    }


class Outbound:
    """The queue on a running node and the task that flushes it through ``send``.

    ``linger`` is how long a put waits for others to join its batch; while the link is
    down the task tries again after a backoff of at most ``max_backoff`` seconds.
    """

    def __init__(
        self,
        queue: OutboundQueue,
        send: Send,
        *,
        linger: float = 1.0,
        max_backoff: float = 30.0,
        metrics: MetricsRegistry | None = None,
    ) -> None:
        self.queue = queue
        self.send = send
        self.linger = linger
        self.max_backoff = max_backoff
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        #: Flushes in a row that found the link down (0: it is up, as far as we know).
        self._failures = 0
        self._counters: tuple[Counter, Counter, Counter, Counter] | None = None
        if metrics is not None:
            self._counters = (
                metrics.counter(
                    "edgeos_outbound_sent_total", "Outbound messages delivered to cloud services."
                ),
                metrics.counter(
                    "edgeos_outbound_requests_total",
                    "Requests that carried outbound batches to cloud services.",
                ),
                metrics.counter(
                    "edgeos_outbound_refused_total",
                    "Outbound messages in batches a cloud service refused for good.",
                ),
                metrics.counter(
                    "edgeos_outbound_dropped_total",
                    "Outbound messages dropped by the declared drop order, by priority.",
                    ("priority",),
                ),
            )
            metrics.collector(self._lines)

    def put(self, service: str, message: Mapping[str, Any], *, priority: str = "normal") -> bool:
        """Queue a message (blocking: a write to the node database) and wake the task,
        unless the link is down: then the message waits for the next retry."""
        kept = self.queue.put(service, message, priority=priority)
        if not self._failures:
            self.wake()
        return kept

    def wake(self) -> None:
        """Flush soon (a message was queued, or the link is back). Callable from any thread."""
        loop = self._loop
        if loop is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to wake
                loop.call_soon_threadsafe(self._wake.set)

    def start(self) -> None:
        """Start flushing on the running event loop (what a restart left is sent first)."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._wake.set()
            self._task = self._loop.create_task(self._run(), name="edgeos-outbound")

    async def stop(self) -> None:
        """Stop flushing; what is queued stays on disk. Safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            if self._failures:
                timeout = backoff_delay(self._failures, base=1.0, cap=self.max_backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            else:
                await self._wake.wait()
                await asyncio.sleep(self.linger)  # let the batch fill
            self._wake.clear()
            try:
                flushed = await self.queue.flush(self.send)
            except Exception:
                log.exception("outbound flush failed; trying again later")
                self._failures += 1
                continue
            self._count(flushed)
            self._failures = self._failures + 1 if flushed.link_down else 0

    def _count(self, flushed: Flushed) -> None:
        if self._counters is None:
            return
        sent, requests, refused, dropped = self._counters
        sent.inc(amount=flushed.messages)
        requests.inc(amount=flushed.requests)
        refused.inc(amount=flushed.refused)
        for priority, count in flushed.dropped.items():
            dropped.inc(priority, amount=count)

    def _lines(self) -> list[str]:
        usage = self.queue.usage()
        return [
            "# HELP edgeos_outbound_queued Outbound messages waiting on disk, by priority.",
            "# TYPE edgeos_outbound_queued gauge",
            *(
                f'edgeos_outbound_queued{{priority="{p}"}} {usage.records.get(p, 0)}'
                for p in PRIORITIES
            ),
            "# HELP edgeos_outbound_bytes Bytes the outbound queue holds, its batch in flight too.",
            "# TYPE edgeos_outbound_bytes gauge",
            f"edgeos_outbound_bytes {usage.bytes}",
            "# HELP edgeos_outbound_dropped_unreported Outbound messages dropped by the declared "
            "drop order and not yet reported with a batch, by priority.",
            "# TYPE edgeos_outbound_dropped_unreported gauge",
            *(
                f'edgeos_outbound_dropped_unreported{{priority="{p}"}} {usage.dropped.get(p, 0)}'
                for p in PRIORITIES
            ),
        ]
