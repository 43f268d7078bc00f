"""The fleet's telemetry: what devices send, stored in time buckets, and the queries over it.

Storage: KPI records in one-minute buckets per (device, minute, agent, model, version) in
``telemetry_kpis``, latencies as DDSketches, which are also merged fleet-wide per
(minute, agent, model, version) in ``telemetry_sketches`` as they arrive (what a query
over the whole fleet reads: one sketch a minute, not one per device); alerts, traces and logs in
``telemetry_events``; each device's last batch sequence and totals in
``telemetry_devices``. Retention: :data:`KPI_RETENTION_S` for KPIs,
:data:`EVENT_RETENTION_S` for events, pruned for every device when one sends, at most
once every :data:`PRUNE_EVERY_S` per fleet process.

Writing (the ``POST /api/v1/telemetry`` handler):

- ``decode_batch(body: bytes) -> TelemetryBatch``: decompress (bounded), parse, check
  every KPI record and sketch; ConfigError naming what is wrong.
- ``ingest(db, device_id, batch, size, *, now=None) -> TelemetryAck``: one transaction;
  ConflictError for a replayed batch, PermissionDeniedError for another device's batch.
  A batch is new when its sequence is above the device's last accepted one, or, when it
  is not, when it was made after every batch accepted so far (``sent_at``): the device's
  sequence started again (its database was restored from a backup or reset), and
  refusing would lose everything it sends until its sequence caught up. The same batch
  sent again (an acknowledgement lost), an older one, or one made before the sequence
  last started again is a replay.

Reading (for the dashboard, the alerts and ``/api/v1/telemetry/...``); every time is Unix
seconds, ranges are ``[start, end)``, filters are optional and combine:

- ``kpi_series(db, *, start, end, bucket_s=300, device_id=None, group=None, agent=None,
  model=None) -> list[KpiPoint]``: one point per bucket that has data, oldest first;
  percentiles come from the merged sketches of every device and minute in the bucket.
- ``kpi_summary(db, *, start, end, ...same filters) -> KpiPoint``: the whole range as one
  point (``KpiPoint.start`` is ``start``).
- ``kpi_by(db, dimension, *, start, end, ...same filters) -> dict[str, KpiPoint]``: one
  point per ``"device"``, ``"agent"`` or ``"model"`` (``name@version``) over the range.
- ``latest_per_device(db, *, group=None) -> list[DeviceTelemetry]``: each device's last
  batch (time, sequence, totals, drops) and its KPIs over its last five minutes of data.
- ``events(db, *, kind=None, device_id=None, start=None, end=None, limit=100) ->
  list[TelemetryEvent]``: alerts, traces or logs, newest first.

:class:`KpiPoint` figures are None where there is nothing to compute them from
(no runs, no answers, no latencies).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from edgeos.errors import ConfigError, ConflictError, PermissionDeniedError
from edgeos.fleet import tables
from edgeos.fleet.db import FleetDatabase
from edgeos.protocol.telemetry import (
    MAX_BATCH_BYTES,
    MAX_BATCH_RAW_BYTES,
    KpiRecord,
    TelemetryAck,
    TelemetryBatch,
    decompressor,
)
from edgeos.telemetry.sketch import (
    DEFAULT_ALPHA,
    DDSketch,
    DenseParts,
    SketchError,
    SparseParts,
    dense_parts,
    sparse_parts,
)

KPI_RETENTION_S = 30 * 86_400
EVENT_RETENTION_S = 7 * 86_400
#: How often an ingesting process prunes what retention lets go: pruning with every batch
#: took a fifth of the ingest rate on PostgreSQL, to delete rows a minute earlier.
PRUNE_EVERY_S = 60.0
#: How far ahead of the fleet's clock a record may be dated (a device clock gone wrong
#: would otherwise put data where no query looks, or keep it from retention).
MAX_AHEAD_S = 3600.0
#: The most rows a series query reads before it refuses (ask for a shorter range).
MAX_QUERY_ROWS = 2_000_000
Dimension = Literal["device", "agent", "model"]

_K, _E, _D = tables.telemetry_kpis, tables.telemetry_events, tables.telemetry_devices
_R = tables.telemetry_sketches
_COUNTS = ("runs", "succeeded", "failed", "answered", "overrides", "errors", "recoveries")
#: A KPI row's key besides its device: (minute, agent, model, version).
_Key = tuple[int, str, str, str]
_KEY_COLUMNS = ("minute", "agent", "model", "version")

log = logging.getLogger(__name__)


# -- writing ------------------------------------------------------------------------------
def _keyed(table: sa.Table) -> Any:
    """The key columns of ``table`` as one tuple, to match several keys in one query."""
    return sa.tuple_(*(table.c[name] for name in _KEY_COLUMNS))


# The statements every batch runs, built once: building them per batch (and SQLAlchemy's
# cache key for each) took a third of the ingest's CPU.
_DEVICE_SEQ = sa.select(_D.c.dropped, _D.c.last_seq).where(_D.c.device_id == sa.bindparam("device"))
_SEQ = sa.bindparam("seq", type_=sa.BigInteger)
_SENT_AT = sa.bindparam("sent_at", type_=sa.Float)
#: A higher sequence is new unless made before the sequence last started again (a batch
#: from before a restore); a lower one only when made after every batch so far.
#: Conditional, so two replicas cannot both take the same batch. It returns when the
#: sequence last started again: the batch's own time when this one started it.
_ADVANCE = (
    sa.update(_D)
    .where(
        _D.c.device_id == sa.bindparam("device"),
        sa.or_(
            sa.and_(
                _D.c.last_seq < _SEQ,
                sa.or_(_D.c.restarted_at.is_(None), _D.c.restarted_at <= _SENT_AT),
            ),
            _D.c.last_sent_at < _SENT_AT,
        ),
    )
    .values(
        last_seq=_SEQ, batches=_D.c.batches + 1, records=_D.c.records + sa.bindparam("records"),
        bytes=_D.c.bytes + sa.bindparam("size"), last_at=sa.bindparam("now"),
        last_sent_at=sa.case((_D.c.last_sent_at > _SENT_AT, _D.c.last_sent_at), else_=_SENT_AT),
        restarted_at=sa.case((_D.c.last_seq >= _SEQ, _SENT_AT), else_=_D.c.restarted_at),
    )
    .returning(_D.c.restarted_at)
)  # fmt: skip
#: The same, adding to the counts of records the device dropped.
_ADVANCE_DROPPED = _ADVANCE.values(dropped=sa.bindparam("dropped"))
_KEYS: sa.BindParameter[Any] = sa.bindparam("keys", expanding=True)
_DEVICE_KPIS = sa.select(_K).where(
    _K.c.device_id == sa.bindparam("device"),
    _keyed(_K).in_(_KEYS),
)
_INSERT_KPIS = sa.insert(_K)
#: The fleet's sketches of a batch's keys, locked in key order (concurrent batches lock
#: them in the same order).
_LOCK_SKETCHES = (
    sa.select(_R).where(_keyed(_R).in_(_KEYS)).order_by(*_R.primary_key.columns).with_for_update()
)
_UPDATE_SKETCHES = (
    sa.update(_R)
    .where(*(_R.c[name] == sa.bindparam(f"k_{name}") for name in _KEY_COLUMNS))
    .values(decision=sa.bindparam("new_decision"), inference=sa.bindparam("new_inference"))
)
_INSERT_SKETCHES = sa.insert(_R)


def decode_batch(body: bytes) -> TelemetryBatch:
    """The batch in ``body`` (zstd of JSON); ConfigError naming what is wrong with it."""
    import zstandard

    if len(body) > MAX_BATCH_BYTES:
        raise ConfigError(f"telemetry batch of {len(body)} bytes: at most {MAX_BATCH_BYTES}")
    try:
        reader = decompressor().stream_reader(io.BytesIO(body))
        raw = reader.read(MAX_BATCH_RAW_BYTES + 1)
    except zstandard.ZstdError as exc:
        raise ConfigError(f"telemetry batch is not zstd-compressed data: {exc}") from exc
    if len(raw) > MAX_BATCH_RAW_BYTES:
        raise ConfigError(
            f"telemetry batch decompresses to more than {MAX_BATCH_RAW_BYTES} bytes: refused"
        )
    try:
        batch = TelemetryBatch.model_validate_json(raw)
    except ValidationError as exc:
        raise ConfigError(f"telemetry batch: {_problems(exc)}") from exc
    for index, record in enumerate(batch.records):
        if record.kind == "kpi":
            where = f"telemetry batch record {index} (kpi)"
            try:
                kpi = KpiRecord.model_validate(record.data)
            except ValidationError as exc:
                raise ConfigError(f"{where}: {_problems(exc)}") from exc
            _check_kpi(kpi, where)
    return batch


def _problems(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(body)"
    return f"{exc.error_count()} problem(s), first: field '{where}': {first['msg']}"


def _check_kpi(kpi: KpiRecord, where: str) -> None:
    if not (kpi.agent or kpi.model):
        raise ConfigError(f"{where}: names neither an agent nor a model")
    if kpi.succeeded + kpi.failed > kpi.runs or kpi.overrides > kpi.answered:
        raise ConfigError(f"{where}: counts do not add up (succeeded + failed > runs, or "
                          "overrides > answered)")  # fmt: skip
    for name in ("decision", "inference"):
        text = getattr(kpi, name)
        if text is not None:
            _sketch(text, f"{where} field '{name}'")


def _sketch(text: str, where: str) -> DDSketch:
    try:
        sketch = DDSketch.from_bytes(base64.b64decode(text, validate=True))
    except (ValueError, SketchError) as exc:
        raise ConfigError(f"{where}: not a sketch ({exc})") from exc
    if sketch.alpha != DEFAULT_ALPHA:
        raise ConfigError(f"{where}: sketch accuracy {sketch.alpha}, expected {DEFAULT_ALPHA}")
    return sketch


def ingest(
    db: FleetDatabase, device_id: str, batch: TelemetryBatch, size: int, *, now: float | None = None
) -> TelemetryAck:
    """Store an accepted batch of ``device_id`` (the certificate's) in one transaction;
    its records older than retention keeps are left out."""
    now = time.time() if now is None else now
    if batch.device_id != device_id:
        raise PermissionDeniedError(
            f"device {device_id} sent a telemetry batch of device {batch.device_id}"
        )
    kpis: dict[_Key, dict[str, Any]] = {}
    events = []
    for index, record in enumerate(batch.records):
        kpi = KpiRecord.model_validate(record.data) if record.kind == "kpi" else None
        when = max(record.at, kpi.minute if kpi is not None else 0)
        if when > now + MAX_AHEAD_S:
            raise ConfigError(f"telemetry batch record {index} is dated {when - now:.0f} s "
                              "ahead of the fleet's clock: check the device's clock")  # fmt: skip
        # What retention would prune at once is not stored at all.
        if kpi is not None:
            if kpi.minute >= now - KPI_RETENTION_S:
                _fold(kpis, kpi)
        elif record.at >= now - EVENT_RETENTION_S:
            events.append({"device_id": device_id, "kind": record.kind, "at": record.at,
                           "data": orjson.dumps(record.data).decode()})  # fmt: skip
    prune = _prune_due(db, now)
    try:
        with db.begin() as conn:
            _advance(conn, device_id, batch, size, now)
            _store_kpis(conn, device_id, kpis)
            if events:
                conn.execute(sa.insert(_E), events)
            if prune:
                _prune(conn, now)
            # Last: every device's batch of a minute updates these rows, which stay locked
            # until the commit, so nothing else is done while holding them.
            _roll_up(conn, kpis)
    except IntegrityError as exc:  # the same device's first batch, twice at once
        raise ConflictError(f"telemetry batch {batch.seq} of device {device_id} raced "
                            "another: send it again") from exc  # fmt: skip
    return TelemetryAck(seq=batch.seq, stored=len(batch.records))


def _advance(
    conn: Connection, device_id: str, batch: TelemetryBatch, size: int, now: float
) -> None:
    """Move the device's sequence on to the batch's, or refuse it as a replay."""
    params = {"device": device_id, "seq": batch.seq, "sent_at": batch.sent_at,
              "records": len(batch.records), "size": size, "now": now}  # fmt: skip
    # Most batches drop nothing: one statement moves a known device on.
    if not batch.dropped:
        moved = conn.execute(_ADVANCE, params).first()
        if moved is not None:
            _restarted(device_id, batch, moved.restarted_at)
            return
    found = conn.execute(_DEVICE_SEQ, {"device": device_id}).first()
    if found is None:
        conn.execute(sa.insert(_D).values(
            device_id=device_id, last_seq=batch.seq, batches=1, records=len(batch.records),
            bytes=size, dropped=orjson.dumps(batch.dropped).decode(), last_at=now,
            last_sent_at=batch.sent_at,
        ))  # fmt: skip
        return
    total = orjson.loads(found.dropped)
    for kind, n in batch.dropped.items():
        total[kind] = total.get(kind, 0) + n
    moved = conn.execute(
        _ADVANCE_DROPPED, {**params, "dropped": orjson.dumps(total).decode()}
    ).first()
    if moved is None:
        raise ConflictError(
            f"telemetry batch {batch.seq} of device {device_id} replayed: the last accepted "
            f"is {found.last_seq}, and this one was not made after it"
        )
    _restarted(device_id, batch, moved.restarted_at)


def _restarted(device_id: str, batch: TelemetryBatch, restarted_at: float | None) -> None:
    """Say so when ``batch`` started the device's sequence again (it was taken)."""
    if restarted_at is not None and restarted_at == batch.sent_at:
        log.warning(
            "device %s started its telemetry sequence again at %d: its database was "
            "restored or reset", device_id, batch.seq,
        )  # fmt: skip


def _fold(kpis: dict[_Key, dict[str, Any]], kpi: KpiRecord) -> None:
    key = (kpi.minute, kpi.agent, kpi.model, kpi.version)
    row = kpis.get(key)
    new = _row_of(kpi)
    kpis[key] = new if row is None else _merged(row, new)


def _row_of(kpi: KpiRecord) -> dict[str, Any]:
    row: dict[str, Any] = {name: getattr(kpi, name) for name in _COUNTS}
    row.update(cost=kpi.cost, recovery_s=kpi.recovery_s, drift=kpi.drift)
    for name in ("decision", "inference"):
        text = getattr(kpi, name)
        row[name] = None if text is None else base64.b64decode(text)
    return row


def _merged(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {name: old[name] + new[name] for name in (*_COUNTS, "cost", "recovery_s")}
    drifts = [d for d in (old["drift"], new["drift"]) if d is not None]
    row["drift"] = max(drifts) if drifts else None
    for name in ("decision", "inference"):
        row[name] = _merged_sketch(old[name], new[name])
    return row


def _merged_sketch(old: bytes | None, new: bytes | None) -> bytes | None:
    if old is None or new is None:
        return new if old is None else old
    sketch = DDSketch.from_bytes(old)
    sketch.merge(DDSketch.from_bytes(new))
    return sketch.to_bytes()


def _key_of(row: Any) -> _Key:
    return (int(row["minute"]), row["agent"], row["model"], row["version"])


def _store_kpis(conn: Connection, device_id: str, kpis: Mapping[_Key, dict[str, Any]]) -> None:
    """The batch's rows added to the device's: one query finds the rows already there (a
    minute sent again), new ones go in at once."""
    keys = sorted(kpis)
    found = {
        _key_of(row): dict(row)
        for row in conn.execute(_DEVICE_KPIS, {"device": device_id, "keys": keys}).mappings()
    }
    new = [
        {"device_id": device_id, **dict(zip(_KEY_COLUMNS, key, strict=True)), **kpis[key]}
        for key in keys
        if key not in found
    ]
    if new:
        conn.execute(_INSERT_KPIS, new)
    for key in keys:
        if key in found:
            where = [_K.c.device_id == device_id, _keyed(_K) == sa.tuple_(*key)]
            conn.execute(sa.update(_K).where(*where).values(**_merged(found[key], kpis[key])))


def _roll_up(conn: Connection, kpis: Mapping[_Key, dict[str, Any]]) -> None:
    """Add the batch's latency sketches to the fleet's of their minutes
    (``telemetry_sketches``): the rows locked in one query, in key order (concurrent
    batches lock them in the same order), then written at once."""
    keys = sorted(k for k, row in kpis.items() if row["decision"] or row["inference"])
    # Twice at most: rows another batch inserted meanwhile are merged into the second time.
    for _ in range(2):
        if not keys:
            return
        found = {
            _key_of(row): row for row in conn.execute(_LOCK_SKETCHES, {"keys": keys}).mappings()
        }
        merged = [
            {**{f"k_{name}": value for name, value in zip(_KEY_COLUMNS, key, strict=True)},
             "new_decision": _merged_sketch(found[key]["decision"], kpis[key]["decision"]),
             "new_inference": _merged_sketch(found[key]["inference"], kpis[key]["inference"])}
            for key in keys if key in found
        ]  # fmt: skip
        if merged:
            conn.execute(_UPDATE_SKETCHES, merged)
        keys = [key for key in keys if key not in found]
        if not keys:
            return
        try:
            with conn.begin_nested():
                conn.execute(_INSERT_SKETCHES, [
                    {**dict(zip(_KEY_COLUMNS, key, strict=True)),
                     "decision": kpis[key]["decision"], "inference": kpis[key]["inference"]}
                    for key in keys
                ])  # fmt: skip
            return
        except IntegrityError:
            continue
    raise ConflictError("the fleet's latency sketches raced another batch: send it again")


#: When each fleet database was last pruned by this process.
_pruned_at: weakref.WeakKeyDictionary[FleetDatabase, float] = weakref.WeakKeyDictionary()


def _prune_due(db: FleetDatabase, now: float) -> bool:
    """Whether this ingest prunes: none yet in this process, :data:`PRUNE_EVERY_S` since
    the last, or a clock that went back. Two at once both pruning is harmless."""
    last = _pruned_at.get(db)
    if last is not None and last <= now < last + PRUNE_EVERY_S:
        return False
    _pruned_at[db] = now
    return True


def _prune(conn: Connection, now: float) -> None:
    # Every device's, not only the sender's: a device that went silent (or was removed)
    # has its telemetry pruned all the same. Indexed by time, so cheap when nothing is due.
    conn.execute(sa.delete(_K).where(_K.c.minute < now - KPI_RETENTION_S))
    conn.execute(sa.delete(_R).where(_R.c.minute < now - KPI_RETENTION_S))
    conn.execute(sa.delete(_E).where(_E.c.at < now - EVENT_RETENTION_S))


# -- reading ------------------------------------------------------------------------------


@dataclass
class KpiPoint:
    """KPIs over one bucket of time (and whatever the query filtered on)."""

    start: float
    devices: int = 0
    runs: int = 0
    succeeded: int = 0
    failed: int = 0
    answered: int = 0
    overrides: int = 0
    errors: int = 0
    recoveries: int = 0
    cost: float = 0.0
    recovery_s: float = 0.0
    drift: float | None = None
    decisions: int = 0
    inferences: int = 0
    decision_p50_ms: float | None = None
    decision_p99_ms: float | None = None
    inference_p50_ms: float | None = None
    inference_p99_ms: float | None = None
    success_rate: float | None = None
    override_rate: float | None = None
    cost_per_decision: float | None = None
    mttr_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The point as JSON-able data."""
        return asdict(self)


class SketchSum:
    """The sum of many encoded sketches, as one :class:`DDSketch` at the end.

    A query merges a sketch per device and minute: thousands. The usual encodings (dense
    or sparse, with one-byte counts and steps) are added as numpy arrays; any other is
    decoded and merged.
    """

    def __init__(self) -> None:
        self._counts: Any = None  # numpy int64 array; bin ``self._first + k`` at k
        self._first = 0
        self.zeros = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self._rest = DDSketch()

    def add(self, data: bytes) -> None:
        """Add one stored sketch."""
        import numpy as np

        parts: DenseParts | SparseParts | None = dense_parts(data) or sparse_parts(data)
        if parts is None:
            self._rest.merge(DDSketch.from_bytes(data))
            return
        counts = np.frombuffer(parts.counts, dtype=np.uint8)
        offsets = None
        if isinstance(parts, SparseParts):
            offsets = np.zeros(len(counts), dtype=np.int64)
            np.cumsum(np.frombuffer(parts.steps, dtype=np.uint8), out=offsets[1:])
        width = len(counts) if offsets is None else int(offsets[-1]) + 1
        start, end = parts.first, parts.first + width
        if self._counts is None:
            self._counts, self._first = np.zeros(width, dtype=np.int64), start
        elif start < self._first or end > self._first + len(self._counts):
            low = min(start, self._first)
            grown = np.zeros(max(end, self._first + len(self._counts)) - low, dtype=np.int64)
            grown[self._first - low : self._first - low + len(self._counts)] = self._counts
            self._counts, self._first = grown, low
        if offsets is None:
            self._counts[start - self._first : end - self._first] += counts
        else:  # distinct bins: one fancy-indexed add is exact
            self._counts[offsets + (start - self._first)] += counts
        self.zeros += parts.zeros
        self.sum += parts.sum
        self.min = min(self.min, parts.min)
        self.max = max(self.max, parts.max)

    def sketch(self) -> DDSketch:
        """Everything added, as one sketch."""
        bins: dict[int, int] = {}
        if self._counts is not None:
            import numpy as np

            (used,) = np.nonzero(self._counts)
            bins = dict(
                zip((used + self._first).tolist(), self._counts[used].tolist(), strict=True)
            )
        merged = DDSketch.of_counts(bins, zeros=self.zeros, total=self.sum, low=self.min,
                                    high=self.max)  # fmt: skip
        merged.merge(self._rest)
        return merged


@dataclass
class _Acc:
    """A point while its figures are summed: counts by the database, sketches here."""

    point: KpiPoint
    decision: SketchSum = field(default_factory=SketchSum)
    inference: SketchSum = field(default_factory=SketchSum)

    def done(self) -> KpiPoint:
        p = self.point
        decision, inference = self.decision.sketch(), self.inference.sketch()
        p.decisions, p.inferences = decision.count, inference.count
        p.decision_p50_ms, p.decision_p99_ms = _ms(decision, 0.5), _ms(decision, 0.99)
        p.inference_p50_ms, p.inference_p99_ms = _ms(inference, 0.5), _ms(inference, 0.99)
        decided = p.succeeded + p.failed
        p.success_rate = p.succeeded / decided if decided else None
        p.override_rate = p.overrides / p.answered if p.answered else None
        p.cost_per_decision = p.cost / p.runs if p.runs else None
        p.mttr_s = p.recovery_s / p.recoveries if p.recoveries else None
        return p


def _ms(sketch: DDSketch, q: float) -> float | None:
    value = sketch.quantile(q)
    return None if value is None else value * 1000.0


@dataclass(frozen=True)
class _Filters:
    """What a query asks for: a time range, and optionally a device or group, an agent, a
    model (``name`` or ``name@version``)."""

    start: float
    end: float
    device_id: str | None = None
    group: str | None = None
    agent: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.end <= self.start:
            raise ConfigError(f"time range [{self.start}, {self.end}): end must be after start")

    @property
    def fleet_wide(self) -> bool:
        """Whether it spans every device: its sketches can come merged already."""
        return self.device_id is None and self.group is None

    def where(self, table: sa.Table) -> list[Any]:
        """Its conditions on ``table``: the per-device KPIs, or the fleet-wide sketches."""
        where = [table.c.minute >= math.floor(self.start), table.c.minute < math.ceil(self.end)]
        if self.device_id is not None:
            where.append(table.c.device_id == self.device_id)
        if self.group is not None:
            members = sa.select(tables.devices.c.id).where(
                tables.devices.c.group_name == self.group
            )
            where.append(table.c.device_id.in_(members))
        if self.agent is not None:
            where.append(table.c.agent == self.agent)
        if self.model is not None:
            name, _, version = self.model.partition("@")
            where.append(table.c.model == name)
            if version:
                where.append(table.c.version == version)
        return where


_SUMMED = (*_COUNTS, "cost", "recovery_s")
#: What a query groups by, and only counts, on a table (the per-device KPIs or the
#: fleet-wide sketches, which have the same minute, agent, model and version columns).
_OfTable = Callable[[sa.Table], list[Any]]


def _by_device(table: sa.Table) -> list[Any]:
    return [table.c.device_id]


def _by_agent(table: sa.Table) -> list[Any]:
    return [table.c.agent]


def _by_model(table: sa.Table) -> list[Any]:
    return [table.c.model, table.c.version]


def _any_row(table: sa.Table) -> list[Any]:
    return []


def _agent_rows(table: sa.Table) -> list[Any]:
    return [table.c.agent != ""]


def _model_rows(table: sa.Table) -> list[Any]:
    return [table.c.model != ""]


#: kpi_by's dimensions: what to group by, and which rows count.
_BY: dict[str, tuple[_OfTable, _OfTable]] = {
    "device": (_by_device, _any_row),
    "agent": (_by_agent, _agent_rows),
    "model": (_by_model, _model_rows),
}


def _points(
    conn: Connection,
    filters: _Filters,
    keys: _OfTable,
    start_of: Callable[[tuple[Any, ...]], float],
    only: _OfTable = _any_row,
    *,
    merged: bool = True,
) -> dict[tuple[Any, ...], KpiPoint]:
    """One point per value of ``keys`` (one point when there are none), counting only rows
    that meet ``only``: the counts summed by the database, then the latency sketches
    merged here: the fleet's, merged per minute at ingest, when the query spans every
    device (and ``merged``), else each device's of each minute."""
    grouped = keys(_K)  # once: the same expressions in SELECT and GROUP BY (PostgreSQL)
    labels = [key.label(f"k{i}") for i, key in enumerate(grouped)]
    totals = (
        sa.select(
            *labels,
            *(sa.func.coalesce(sa.func.sum(_K.c[name]), 0).label(name) for name in _SUMMED),
            sa.func.max(_K.c.drift).label("drift"),
            sa.func.count(sa.distinct(_K.c.device_id)).label("devices"),
        )
        .where(*filters.where(_K), *only(_K))
        .group_by(*grouped)
    )
    accs: dict[tuple[Any, ...], _Acc] = {}
    for row in conn.execute(totals):
        if not row.devices:
            continue  # no rows: an aggregate without GROUP BY still answers one
        key = tuple(row[: len(labels)])
        figures = {name: row._mapping[name] for name in _SUMMED}
        point = KpiPoint(start=start_of(key), devices=row.devices, drift=row.drift, **figures)
        accs[key] = _Acc(point)
    table = _R if merged and filters.fleet_wide else _K
    sketched = [
        *filters.where(table), *only(table),
        sa.or_(table.c.decision.is_not(None), table.c.inference.is_not(None)),
    ]  # fmt: skip
    count = conn.execute(sa.select(sa.func.count()).where(*sketched)).scalar_one()
    if count > MAX_QUERY_ROWS:
        raise ConfigError(f"the query covers {count} sketches (at most {MAX_QUERY_ROWS}): "
                          "narrow the time range or filter by device or group")  # fmt: skip
    columns = [key.label(f"k{i}") for i, key in enumerate(keys(table))]
    for row in conn.execute(
        sa.select(*columns, table.c.decision, table.c.inference).where(*sketched)
    ):
        acc = accs.get(tuple(row[: len(columns)]))
        if acc is None:  # a sketch with no counted row in the range: nothing to add it to
            continue
        if row.decision is not None:
            acc.decision.add(row.decision)
        if row.inference is not None:
            acc.inference.add(row.inference)
    return {key: acc.done() for key, acc in accs.items()}


def kpi_series(
    db: FleetDatabase,
    *,
    start: float,
    end: float,
    bucket_s: int = 300,
    device_id: str | None = None,
    group: str | None = None,
    agent: str | None = None,
    model: str | None = None,
) -> list[KpiPoint]:
    """KPIs per ``bucket_s`` from ``start`` (to the whole second) to ``end``, buckets
    without data left out."""
    if bucket_s < 60 or bucket_s % 60:
        raise ConfigError(f"bucket of {bucket_s} s: use a multiple of 60 s")
    filters = _Filters(start, end, device_id, group, agent, model)
    origin = math.floor(start)
    with db.read() as conn:
        points = _points(
            conn, filters, lambda table: [(table.c.minute - origin) // bucket_s],
            lambda key: float(origin + key[0] * bucket_s),
        )  # fmt: skip
    return [points[key] for key in sorted(points)]


def kpi_summary(
    db: FleetDatabase,
    *,
    start: float,
    end: float,
    device_id: str | None = None,
    group: str | None = None,
    agent: str | None = None,
    model: str | None = None,
) -> KpiPoint:
    """KPIs over the whole range as one point."""
    filters = _Filters(start, end, device_id, group, agent, model)
    with db.read() as conn:
        points = _points(conn, filters, _any_row, lambda key: start)
    return points.get((), KpiPoint(start=start))


def kpi_by(
    db: FleetDatabase,
    dimension: Dimension,
    *,
    start: float,
    end: float,
    device_id: str | None = None,
    group: str | None = None,
    agent: str | None = None,
    model: str | None = None,
) -> dict[str, KpiPoint]:
    """KPIs over the range, one point per device, agent or model version."""
    if dimension not in _BY:
        raise ConfigError(f"KPIs by {dimension!r}: use device, agent or model")
    keys, only = _BY[dimension]
    filters = _Filters(start, end, device_id, group, agent, model)
    with db.read() as conn:
        # By device, each device's own sketches: the fleet's merged ones cannot tell them apart.
        points = _points(conn, filters, keys, lambda key: start, only, merged=dimension != "device")

    def name(key: tuple[Any, ...]) -> str:
        return f"{key[0]}@{key[1]}" if len(key) == 2 and key[1] else str(key[0])

    return {name(key): points[key] for key in sorted(points)}


@dataclass(frozen=True)
class DeviceTelemetry:
    """A device's telemetry link and its latest KPIs."""

    device_id: str
    last_at: float
    last_seq: int
    batches: int
    records: int
    bytes: int
    dropped: dict[str, int]
    latest: KpiPoint | None

    def to_json(self) -> dict[str, Any]:
        """JSON-able data."""
        doc = asdict(self)
        doc["latest"] = None if self.latest is None else self.latest.to_json()
        return doc


def latest_per_device(db: FleetDatabase, *, group: str | None = None) -> list[DeviceTelemetry]:
    """Every device that sent telemetry: its last batch and its last five minutes of KPIs."""
    query = sa.select(_D).order_by(_D.c.device_id)
    if group is not None:
        members = sa.select(tables.devices.c.id).where(tables.devices.c.group_name == group)
        query = query.where(_D.c.device_id.in_(members))
    with db.read() as conn:
        devices = list(conn.execute(query))
        newest_rows = conn.execute(
            sa.select(_K.c.device_id, sa.func.max(_K.c.minute)).group_by(_K.c.device_id)
        )
        newest = {str(device): int(minute) for device, minute in newest_rows}
    found = []
    for d in devices:
        last = newest.get(d.device_id)
        latest = None
        if last is not None:
            latest = kpi_summary(db, start=last - 240, end=last + 60, device_id=d.device_id)
        found.append(DeviceTelemetry(d.device_id, d.last_at, d.last_seq, d.batches, d.records,
                                     d.bytes, orjson.loads(d.dropped), latest))  # fmt: skip
    return found


@dataclass(frozen=True)
class TelemetryEvent:
    """An alert, trace or log record a device sent."""

    id: int
    device_id: str
    kind: str
    at: float
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """JSON-able data."""
        return asdict(self)


def events(
    db: FleetDatabase,
    *,
    kind: str | None = None,
    device_id: str | None = None,
    start: float | None = None,
    end: float | None = None,
    limit: int = 100,
) -> list[TelemetryEvent]:
    """Events, newest first."""
    query = sa.select(_E).order_by(_E.c.at.desc(), _E.c.id.desc()).limit(limit)
    if kind is not None:
        query = query.where(_E.c.kind == kind)
    if device_id is not None:
        query = query.where(_E.c.device_id == device_id)
    if start is not None:
        query = query.where(_E.c.at >= start)
    if end is not None:
        query = query.where(_E.c.at < end)
    with db.read() as conn:
        return [TelemetryEvent(r.id, r.device_id, r.kind, r.at, orjson.loads(r.data))
                for r in conn.execute(query)]  # fmt: skip
