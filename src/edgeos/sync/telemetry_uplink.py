"""The telemetry uplink: KPIs, alerts, traces and logs to the fleet, within a bandwidth cap.

What goes in:
- **KPIs**: every closed minute, one record per agent and per model version
  (:mod:`edgeos.sync.kpi_records`);
- **anything else** through :func:`edgeos.telemetry.buffer.enqueue` (the traces and the
  alerts of other parts of the node)::

      enqueue("trace", span, trace_id="4bf92f3577b34da6a3ce929d0e0e4736", schema=input_schema)
      enqueue("alert", {"rule": "p99", "state": "firing", ...})

  Traces are sampled by trace id (``telemetry_trace_percent``; all spans of a trace share
  the decision), so a sampled trace arrives whole; a ``log`` record offered with a
  ``trace_id`` (a routine run's outline) shares its trace's decision too.

Redaction, on the device, before anything is stored for sending and again before a batch
leaves: fields a contract marks ``x-personal`` (the ``schema`` given to ``enqueue``) are
replaced by their pseudonyms (:mod:`edgeos.connectors.personal`), and every string holding
a secret of the vault is masked (the vault's :class:`~edgeos.connectors.vault.Redactor`).

How it leaves: records wait in the bounded on-disk buffer (:mod:`edgeos.telemetry.buffer`,
priorities and drop order there). Every ``telemetry_interval_s`` while the fleet link is
online, the most important records become one batch: JSON (:mod:`edgeos.protocol.telemetry`),
zstd-compressed, numbered by a per-device sequence, kept in the node database until the
fleet acknowledges it, and sent again as the same bytes after a failure. The fleet refuses
a sequence it has seen (a replay, or a batch it stored before the acknowledgement was
lost): the node then forgets that batch. Caps: a batch is at most ``telemetry_bytes_per_s``
times the interval, the next one waits until the average is back under the rate, and no more
than ``telemetry_bytes_per_day`` leave per UTC day (then telemetry waits in the buffer,
dropped only by the declared order when it fills); the last quarter of a day's bytes is
kept for alerts and KPIs, so traces and logs cannot starve them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.errors import ConfigError, ConflictError, EdgeOSError
from edgeos.protocol.fleet import API
from edgeos.protocol.telemetry import (
    CONTENT_TYPE,
    MAX_BATCH_BYTES,
    MAX_BATCH_RAW_BYTES,
    MINUTE_S,
    TelemetryAck,
    compressor,
)
from edgeos.state import Database
from edgeos.sync.client import parse_answer, transport_error
from edgeos.sync.kpi_records import KpiCollector
from edgeos.telemetry.buffer import (
    PRIORITIES,
    PendingBatch,
    Record,
    TelemetryBuffer,
    set_sink,
)
from edgeos.telemetry.metrics import MetricsRegistry

if TYPE_CHECKING:
    import httpx

    from edgeos.settings import NodeSettings

log = logging.getLogger("edgeos.sync.telemetry")

#: How many closed minutes one collection catches up on at most (a node stopped for a
#: week sends its last day of KPIs, not a week's).
CATCH_UP_MINUTES = 24 * 60
#: How often the vault's values are read again for masking.
SECRETS_REFRESH_S = 60.0
DAY_S = 86_400
#: The share of the daily byte cap kept for alerts and KPIs (traces and logs stop first).
KPI_RESERVE = 0.25


@dataclass(frozen=True)
class UplinkConfig:
    """The uplink's limits (from the node settings ``telemetry_*``)."""

    interval_s: float = 60.0
    bytes_per_s: int = 2048
    bytes_per_day: int = 4_000_000
    trace_percent: int = 10
    buffer_bytes: int = 16 * 1024 * 1024

    @classmethod
    def of(cls, settings: NodeSettings) -> UplinkConfig:
        """The limits a node's settings give."""
        return cls(
            interval_s=float(settings.telemetry_interval_s),
            bytes_per_s=settings.telemetry_bytes_per_s,
            bytes_per_day=settings.telemetry_bytes_per_day,
            trace_percent=settings.telemetry_trace_percent,
            buffer_bytes=settings.telemetry_buffer_mb * 1024 * 1024,
        )

    @property
    def batch_bytes(self) -> int:
        """The most one batch may weigh, compressed."""
        return min(MAX_BATCH_BYTES, max(1024, int(self.bytes_per_s * self.interval_s)))


def sampled(trace_id: str | None, percent: int) -> bool:
    """Whether the trace ``trace_id`` is sent (the same answer for all its spans)."""
    if percent >= 100:
        return True
    if percent <= 0 or not trace_id:
        return False
    digest = hashlib.sha256(trace_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 10_000 < percent * 100


class TelemetryUplink:
    """Collects, buffers and sends this node's telemetry; see the module docstring."""

    def __init__(
        self,
        db: Database,
        config: UplinkConfig,
        *,
        metrics: MetricsRegistry | None = None,
        secrets: Callable[[], Iterable[str]] = tuple,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db, self.config, self.clock = db, config, clock
        self.buffer = TelemetryBuffer(db, max_bytes=config.buffer_bytes, clock=clock)
        self.kpis = KpiCollector(db, metrics, clock)
        self._secrets = secrets
        self._mask: tuple[float, Callable[[str], str]] | None = None
        self._next_send = 0.0
        self._last_spent = 0.0
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        registry = metrics or MetricsRegistry()
        self._sent_bytes = registry.counter(
            "edgeos_telemetry_sent_bytes_total", "Compressed telemetry bytes sent to the fleet."
        )
        self._sent_batches = registry.counter(
            "edgeos_telemetry_batches_total", "Telemetry batches sent, by outcome.", ["outcome"]
        )

    async def start(self, link: Callable[[], tuple[httpx.AsyncClient, str] | None]) -> None:
        """Receive records and send them in the background (see :meth:`run`)."""
        self.install()
        self._task = asyncio.get_running_loop().create_task(self.run(link), name="edgeos-telemetry")

    async def stop(self) -> None:
        """Stop receiving and sending; what is buffered stays for the next start."""
        self.uninstall()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # -- in ---------------------------------------------------------------------------
    def install(self) -> None:
        """Receive what the node :func:`~edgeos.telemetry.buffer.enqueue`'s."""
        set_sink(self.offer)

    def uninstall(self) -> None:
        """Stop receiving (records offered meanwhile are not kept)."""
        set_sink(None)

    def offer(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        at: float | None = None,
        trace_id: str | None = None,
        schema: dict[str, Any] | None = None,
    ) -> bool:
        """Sample, redact and buffer one record; True when it was kept."""
        # A trace is sampled whole; a log record that names a trace goes with it.
        traced = kind == "trace" or (kind == "log" and trace_id is not None)
        if traced and not sampled(trace_id, self.config.trace_percent):
            return False
        if schema:
            from edgeos.connectors.personal import redact

            payload = redact(schema, payload)
        return self.buffer.put(kind, self._masked(payload), at=at)

    def collect(self) -> int:
        """Buffer the KPI records of every minute closed since the last call; how many."""
        now = self.clock()
        current = int(now // MINUTE_S) * MINUTE_S
        (start,) = (
            self.db.reader()
            .execute("SELECT kpi_minute FROM telemetry_uplink WHERE id = 1")
            .fetchone()
        )
        if int(start) == current:
            return 0  # no minute closed: no write (this runs every few seconds)
        # The first start begins now; a node that was stopped catches up on at most a day.
        start = current if not start else max(int(start), current - CATCH_UP_MINUTES * MINUTE_S)
        records = [
            record for m in range(start, current, MINUTE_S) for record in self.kpis.minute(m)
        ]
        count = 0
        # With the minute they close in one transaction: a crash cannot send a minute twice.
        with self.db.transaction() as conn:
            for record in records:
                data = record.model_dump(exclude_defaults=True)
                data["minute"] = record.minute
                count += self.buffer.put("kpi", data, at=record.minute)
            conn.execute("UPDATE telemetry_uplink SET kpi_minute = ? WHERE id = 1", (current,))
        return count

    # -- out --------------------------------------------------------------------------
    def next_batch(self, device_id: str) -> PendingBatch | None:
        """The batch to send now: the pending one, or a new one within the caps; None when
        there is nothing to send or the caps say wait."""
        now = self.clock()
        if now < self._last_spent:
            # The clock stepped back (a box that booted in the past, then synced): the
            # wait was set on the other time and could last as long as the step.
            self._next_send = self._last_spent = now
        if now < self._next_send:
            return None
        allowance_left_today = self._left_today(now)
        allowance = min(self.config.batch_bytes, allowance_left_today)
        pending = self.buffer.pending()
        if pending is not None:
            return pending if len(pending.body) <= allowance else None
        if allowance < 256:
            return None

        def build(seq: int, records: list[Record], dropped: dict[str, int]) -> bytes | None:
            body = self.encode(device_id, seq, records, dropped)
            return body if len(body) <= allowance else None

        raw_limit = min(MAX_BATCH_RAW_BYTES // 2, allowance * 12)
        # The last part of the day's budget is kept for alerts and KPIs: a busy agent's
        # traces and logs must not spend it all and leave the KPIs waiting for tomorrow.
        reserved = allowance_left_today < self.config.bytes_per_day * KPI_RESERVE
        return self.buffer.take_batch(
            build,
            max_payload_bytes=raw_limit,
            max_priority=PRIORITIES["kpi"] if reserved else None,
        )

    def encode(
        self, device_id: str, seq: int, records: list[Record], dropped: dict[str, int]
    ) -> bytes:
        """A batch body: JSON of a TelemetryBatch, secrets masked, zstd-compressed."""
        mask = self._masked
        doc = {
            "device_id": device_id,
            "seq": seq,
            "sent_at": self.clock(),
            "records": [
                {"kind": r.kind, "at": r.at, "data": mask(orjson.loads(r.payload))} for r in records
            ],
            "dropped": dropped,
        }
        return bytes(compressor().compress(orjson.dumps(doc)))

    async def send(self, client: httpx.AsyncClient, device_id: str) -> bool:
        """Send the batch due now, if any; True when one was acknowledged."""
        import httpx

        batch = await asyncio.to_thread(self.next_batch, device_id)
        if batch is None:
            return False
        await asyncio.to_thread(self._spent, len(batch.body))
        try:
            response = await client.post(
                f"{API}/telemetry", content=batch.body, headers={"content-type": CONTENT_TYPE}
            )
        except httpx.HTTPError as exc:
            self._failed("offline", transport_error(exc, str(client.base_url), "telemetry"))
            return False
        try:
            parse_answer(response, TelemetryAck, "the telemetry batch")
        except (ConflictError, ConfigError) as exc:
            # A sequence the fleet has (a lost acknowledgement) or a batch it will never
            # take: sending the same bytes again cannot help.
            log.warning("telemetry batch %d dropped: %s", batch.seq, exc)
            await asyncio.to_thread(self.buffer.acknowledge, batch.seq)
            self._sent_batches.inc("refused")
            self.last_error = str(exc)
            return False
        except EdgeOSError as exc:
            self._failed("failed", exc)
            return False
        await asyncio.to_thread(self.buffer.acknowledge, batch.seq)
        self._sent_batches.inc("acknowledged")
        self.last_error = None
        return True

    async def run(
        self, link: Callable[[], tuple[httpx.AsyncClient, str] | None], tick_s: float = 2.0
    ) -> None:
        """Collect and send until cancelled; ``link`` gives the device's client and id
        while the fleet link is online (None otherwise)."""
        while True:
            try:
                await asyncio.to_thread(self.collect)
                online = link()
                if online is not None:
                    while await self.send(*online):
                        pass
            except asyncio.CancelledError:
                raise
            except Exception:  # telemetry must never stop the node
                log.exception("telemetry uplink failed")
            await asyncio.sleep(tick_s)

    # -- internals ----------------------------------------------------------------------
    def _failed(self, outcome: str, exc: EdgeOSError) -> None:
        self._sent_batches.inc(outcome)
        self.last_error = str(exc)
        log.info("telemetry batch not delivered, kept for later: %s", exc)

    def _left_today(self, now: float) -> int:
        day, spent = (
            self.db.reader()
            .execute("SELECT day, day_bytes FROM telemetry_uplink WHERE id = 1")
            .fetchone()
        )
        spent = int(spent) if int(day) == int(now // DAY_S) else 0
        return max(0, self.config.bytes_per_day - spent)

    def _spent(self, size: int) -> None:
        """Count ``size`` bytes against today's cap and the rate (before they leave)."""
        now = self.clock()
        today = int(now // DAY_S)
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE telemetry_uplink SET day_bytes = CASE WHEN day = ? THEN day_bytes + ? "
                "ELSE ? END, day = ? WHERE id = 1",
                (today, size, size, today),
            )
        self._last_spent = now
        self._next_send = now + max(self.config.interval_s, size / self.config.bytes_per_s)
        self._sent_bytes.inc(amount=size)

    def _masked(self, payload: Any) -> Any:
        """``payload`` with every string that holds a vault secret masked."""
        now = self.clock()
        if self._mask is None or now - self._mask[0] >= SECRETS_REFRESH_S:
            values = [v for v in self._secrets() if len(v) >= 4]
            if values:
                from edgeos.connectors.vault import Redactor

                self._mask = (now, Redactor(values))
            else:
                self._mask = (now, _unchanged)
        return _map_strings(payload, self._mask[1])


def vault_secrets(db: Database, data_dir: Path) -> Callable[[], list[str]]:
    """The vault's current values, for masking (the vault opens only once it holds any)."""
    opened: list[Any] = []

    def values() -> list[str]:
        if db.reader().execute("SELECT 1 FROM secrets LIMIT 1").fetchone() is None:
            return []
        if not opened:
            from edgeos.connectors.vault import Vault, load_key

            opened.append(Vault(db, load_key(data_dir)))
        found: list[str] = opened[0].values()
        return found

    return values


def _unchanged(text: str) -> str:
    return text


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(str(k)): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value
