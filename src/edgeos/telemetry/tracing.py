"""Traces of agent runs: OpenTelemetry spans from a run's decision to the call it made.

One trace per run: ``run`` → ``step`` → ``model`` calls and ``effect`` decisions →
``deliver`` (the connector's call, which passes the W3C ``traceparent`` on). Runs survive
SIGKILL, so the ids that tie a trace together are derived, not remembered: the trace id
and the run span's id from the run id, an effect's span id from its idempotency key. A
node that resumes a run in a new process, or delivers an effect another process decided,
joins the same trace. Span attributes are structural only (names, indexes, keys, status
codes, durations), never payloads, inputs, outputs or error texts, so personal fields and
secrets cannot reach a span.

Finished spans go, in batches, to a bounded ``spans`` table of the node database
(:func:`configure` takes its transaction factory), from there to the telemetry uplink
(:func:`edgeos.telemetry.buffer.enqueue`, which samples whole traces for the fleet) and,
when an endpoint is set, to an OTLP/HTTP collector. The OpenTelemetry SDK is imported with the first span, never by a
node that is idle or has tracing off. Spans still in the batch when the process is
killed are lost; the trace id is not.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any, Protocol

from edgeos.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, Span, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

Transaction = Callable[[], AbstractContextManager[sqlite3.Connection]]


@dataclass(frozen=True)
class TraceConfig:
    """How a node keeps and sends its spans."""

    #: Spans kept in the node database; the oldest go first.
    keep_spans: int = 20_000
    #: OTLP/HTTP traces endpoint (``http://collector:4318/v1/traces``), or None.
    otlp_endpoint: str | None = None
    service_name: str = "edgeos-node"
    #: How long finished spans wait to be written together.
    batch_delay_s: float = 0.2


# -- ids ------------------------------------------------------------------------------
def _derived(kind: str, value: str, size: int) -> int:
    raw = hashlib.sha256(f"edgeos.{kind}:{value}".encode()).digest()[:size]
    return int.from_bytes(raw, "big") or 1  # zero is the invalid id


def trace_id(run_id: str) -> str:
    """The trace id of a run (32 hex digits): the same in every process, after any crash."""
    return f"{_derived('trace', run_id, 16):032x}"


def run_span_id(run_id: str) -> str:
    """The span id of a run's root span (16 hex digits)."""
    return f"{_derived('run', run_id, 8):016x}"


def effect_span_id(key: str) -> str:
    """The span id of the decision to make an effect, from its idempotency key."""
    return f"{_derived('effect', key, 8):016x}"


def traceparent(trace: str, span: str) -> str:
    """A W3C ``traceparent`` header value for a sampled span."""
    return f"00-{trace}-{span}-01"


def run_of_key(key: str) -> str | None:
    """The run id in an effect's key (``RUN:STEP_INDEX:N``), or None for another key."""
    parts = key.rsplit(":", 2)
    if len(parts) == 3 and parts[0] and parts[1].isdigit() and parts[2].isdigit():
        return parts[0]
    return None


# -- what the executor hands over (kept structural: the agents layer is above this one) -
class ModelCallLike(Protocol):
    """A model call as a step's record holds it."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def latency_ms(self) -> float: ...
    @property
    def cost(self) -> float: ...
    @property
    def at(self) -> float: ...
    @property
    def venue(self) -> Mapping[str, Any] | None: ...


class EffectLike(Protocol):
    """An effect as a step's record holds it."""

    @property
    def key(self) -> str: ...
    @property
    def connector(self) -> str: ...
    @property
    def operation(self) -> str: ...


class StepRecordLike(Protocol):
    """What a step did, read when its span ends."""

    @property
    def model_calls(self) -> Sequence[ModelCallLike]: ...


# -- the tracer -----------------------------------------------------------------------
class _Tracing:
    """The configured tracer of this process; the SDK is loaded by the first span."""

    def __init__(self, config: TraceConfig, transaction: Transaction) -> None:
        self.config = config
        self.transaction = transaction
        self._lock = threading.Lock()
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None

    def tracer(self) -> Tracer:
        with self._lock:
            if self._tracer is None:
                self._provider, self._tracer = _start_sdk(self.config, self.transaction)
            return self._tracer

    def flush(self, timeout_s: float) -> None:
        if self._provider is not None:
            self._provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is not None:
            provider.shutdown()


_active: _Tracing | None = None
# Ids the next span must take (derived ones), read by the SDK's id generator.
_forced_ids: contextvars.ContextVar[tuple[int | None, int | None]] = contextvars.ContextVar(
    "edgeos_forced_span_ids", default=(None, None)
)


def configure(config: TraceConfig, transaction: Transaction) -> None:
    """Trace this process's runs, keeping spans through ``transaction`` (the node
    database's write transaction). Replaces an earlier configuration.

    ConfigError when an OTLP endpoint is set but its exporter is not installed.
    """
    global _active
    if config.otlp_endpoint and find_spec("opentelemetry.exporter.otlp.proto.http") is None:
        raise ConfigError(
            f"setting trace_otlp_endpoint = {config.otlp_endpoint!r} needs the OTLP exporter: "
            "pip install 'edgeos[otlp]'"
        )
    shutdown()
    _active = _Tracing(config, transaction)


def enabled() -> bool:
    """Whether this process records spans."""
    return _active is not None


def flush(timeout_s: float = 5.0) -> None:
    """Write every finished span now (the node stops, or a test reads them)."""
    if _active is not None:
        _active.flush(timeout_s)


def shutdown() -> None:
    """Flush and stop tracing. Safe to call twice."""
    global _active
    tracing, _active = _active, None
    if tracing is not None:
        tracing.shutdown()


def _start_sdk(config: TraceConfig, transaction: Transaction) -> tuple[TracerProvider, Tracer]:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class DerivedIds(RandomIdGenerator):
        """Random ids, except where a span's id is derived (runs, effects)."""

        def generate_trace_id(self) -> int:
            forced = _forced_ids.get()[0]
            return forced if forced is not None else super().generate_trace_id()

        def generate_span_id(self) -> int:
            forced = _forced_ids.get()[1]
            return forced if forced is not None else super().generate_span_id()

    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        id_generator=DerivedIds(),
        shutdown_on_exit=False,  # the node flushes as it stops, while its database is open
    )
    delay_ms = max(int(config.batch_delay_s * 1000), 1)
    provider.add_span_processor(
        BatchSpanProcessor(
            _local_exporter(transaction, config.keep_spans), schedule_delay_millis=delay_ms
        )
    )
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=10))
        )
    return provider, provider.get_tracer("edgeos")


def _parent(trace: str, span: str) -> Context:
    from opentelemetry import trace as api
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    context = SpanContext(int(trace, 16), int(span, 16), False, TraceFlags(TraceFlags.SAMPLED))
    return api.set_span_in_context(NonRecordingSpan(context))


def _start(
    name: str,
    *,
    parent: Context | None,
    start_ns: int,
    attributes: dict[str, Any],
    trace: str | None = None,
    span: str | None = None,
) -> Span:
    assert _active is not None
    forced = (int(trace, 16) if trace else None, int(span, 16) if span else None)
    token = _forced_ids.set(forced)
    try:
        started = _active.tracer().start_span(
            name, context=parent, start_time=start_ns, attributes=attributes
        )
    finally:
        _forced_ids.reset(token)
    return started  # type: ignore[return-value]  # the SDK's tracer makes SDK spans


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _error(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    # The type only: a message may quote a payload.
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


# -- spans of a run -------------------------------------------------------------------
class StepSpan:
    """The span of one attempt at a step, while it runs and after."""

    def __init__(self, run_id: str, span: Span | None) -> None:
        self.run_id = run_id
        self._span = span

    def effects_committed(self, effects: Sequence[EffectLike]) -> None:
        """Record the effects the step's commit made durable, as children of its span."""
        span = self._span
        if span is None or _active is None or not effects:
            return
        parent = _parent(trace_id(self.run_id), f"{span.context.span_id:016x}")
        at = span.end_time or _time_ns()
        for effect in effects:
            decided = _start(
                f"effect {effect.connector}.{effect.operation}",
                parent=parent,
                start_ns=at,
                attributes={
                    "edgeos.effect.key": effect.key,
                    "edgeos.connector": effect.connector,
                    "edgeos.operation": effect.operation,
                },
                span=effect_span_id(effect.key),
            )
            decided.end(end_time=at)


_OFF = StepSpan("", None)


def _time_ns() -> int:
    import time

    return time.time_ns()


@contextlib.contextmanager
def step_span(
    run_id: str,
    *,
    agent: str,
    step: str,
    index: int,
    attempt: int,
    record: StepRecordLike,
    parked: tuple[type[BaseException], ...] = (),
) -> Iterator[StepSpan]:
    """Trace one attempt at a step: its model calls (from ``record``) become children, an
    exception marks it failed, except one of ``parked`` (the run waits for a person)."""
    if _active is None:
        yield _OFF
        return
    span = _start(
        f"step {step}",
        parent=_parent(trace_id(run_id), run_span_id(run_id)),
        start_ns=_time_ns(),
        attributes={
            "edgeos.run.id": run_id, "edgeos.agent": agent, "edgeos.step": step,
            "edgeos.step.index": index, "edgeos.step.attempt": attempt,
        },
    )  # fmt: skip
    handle = StepSpan(run_id, span)
    try:
        yield handle
    except BaseException as exc:
        if isinstance(exc, parked):
            span.set_attribute("edgeos.step.outcome", "waiting_human")
        else:
            _error(span, exc)
        raise
    finally:
        _model_spans(run_id, span, record.model_calls)
        span.end()


def _model_spans(run_id: str, step: Span, calls: Sequence[ModelCallLike]) -> None:
    parent = _parent(trace_id(run_id), f"{step.context.span_id:016x}")
    for call in calls:
        end = _ns(call.at)
        attributes: dict[str, Any] = {
            "edgeos.model": call.model, "edgeos.model.version": call.version,
            "edgeos.model.latency_ms": round(call.latency_ms, 3), "edgeos.cost": call.cost,
        }  # fmt: skip
        name = f"model {call.model}"
        if call.venue is not None:  # a routed call: the venue decision and where it ran
            name = f"venue {call.venue.get('model', call.model)} -> {call.venue.get('venue')}"
            attributes.update(_venue_attributes(call.venue))
        child = _start(
            name, parent=parent, start_ns=end - int(call.latency_ms * 1e6), attributes=attributes
        )
        child.end(end_time=end)


#: What a span keeps of a venue decision: its terms and outcome, not its reasons' texts
#: (a failover's reason quotes the error a venue gave).
_VENUE_FIELDS = ("venue", "escalated_to", "privacy", "slo_ms", "min_quality", "cascade",
                 "confidence", "all_cloud_cost")  # fmt: skip


def _venue_attributes(decision: Mapping[str, Any]) -> dict[str, Any]:
    kept = {
        f"edgeos.routing.{key}": decision[key]
        for key in _VENUE_FIELDS
        if isinstance(decision.get(key), str | int | float) and not isinstance(decision[key], bool)
    }
    kept["edgeos.routing.alternatives"] = len(decision.get("alternatives") or ())
    return kept


def run_finished(
    run_id: str,
    *,
    agent: str,
    version: str,
    trigger: str,
    state: str,
    created_at: float,
    finished_at: float,
) -> None:
    """Record a finished run's root span (its id derived, so every step already points at it)."""
    if _active is None:
        return
    span = _start(
        f"run {agent}",
        parent=None,
        start_ns=_ns(created_at),
        attributes={
            "edgeos.run.id": run_id, "edgeos.agent": agent, "edgeos.agent.version": version,
            "edgeos.run.trigger": trigger.split(":", 1)[0], "edgeos.run.state": state,
        },
        trace=trace_id(run_id),
        span=run_span_id(run_id),
    )  # fmt: skip
    if state != "succeeded":
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, state))
    span.end(end_time=max(_ns(finished_at), _ns(created_at)))


class DeliverySpan:
    """The span of one delivery attempt; ``traceparent`` is what the call passes on.

    The delivery worker opens it around the connector's call (:func:`delivery_span`);
    a connector reaches it with :func:`current_delivery`.
    """

    def __init__(self, span: Span | None) -> None:
        self._span = span
        self.traceparent: str | None = None
        if span is not None:
            context = span.context
            self.traceparent = traceparent(f"{context.trace_id:032x}", f"{context.span_id:016x}")

    def set_status_code(self, status: int) -> None:
        """The receiver's HTTP status."""
        if self._span is not None:
            self._span.set_attribute("http.response.status_code", status)


_NO_DELIVERY = DeliverySpan(None)
# The attempt under way in this task: a connector passes its traceparent on (HTTP's
# header) and records what the target answered, without being handed the span.
_delivering: contextvars.ContextVar[DeliverySpan] = contextvars.ContextVar(
    "edgeos_delivering", default=_NO_DELIVERY
)


def current_delivery() -> DeliverySpan:
    """The span of the delivery attempt the calling connector is making (one that records
    nothing when tracing is off or the effect belongs to no run)."""
    return _delivering.get()


@contextlib.contextmanager
def delivery_span(key: str, *, connector: str, operation: str) -> Iterator[DeliverySpan]:
    """Trace one delivery attempt of an effect, as a child of the decision to make it;
    the span is :func:`current_delivery` within the block (and the tasks it starts)."""
    run_id = None if _active is None else run_of_key(key)
    if run_id is None:
        yield _NO_DELIVERY
        return
    span = _start(
        f"deliver {connector}.{operation}",
        parent=_parent(trace_id(run_id), effect_span_id(key)),
        start_ns=_time_ns(),
        attributes={
            "edgeos.effect.key": key, "edgeos.connector": connector,
            "edgeos.operation": operation,
        },
    )  # fmt: skip
    delivering = DeliverySpan(span)
    token = _delivering.set(delivering)
    try:
        yield delivering
    except BaseException as exc:
        _error(span, exc)
        raise
    finally:
        _delivering.reset(token)
        span.end()


# -- the local store ------------------------------------------------------------------
def _local_exporter(transaction: Transaction, keep: int) -> SpanExporter:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class LocalExporter(SpanExporter):
        """Writes finished spans to the node database's ``spans`` table, keeping the newest."""

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            rows = [_row(s) for s in spans]
            try:
                with transaction() as conn:
                    conn.executemany(
                        "INSERT INTO spans (trace_id, span_id, parent_id, name, start_ns, "
                        "end_ns, status, attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (trace_id, span_id) DO NOTHING",
                        rows,
                    )
                    conn.execute(
                        "DELETE FROM spans WHERE seq <= (SELECT MAX(seq) FROM spans) - ?", (keep,)
                    )
            except Exception as exc:  # a full disk or a closed database: traces are expendable
                log.warning("%d span(s) not kept: %s", len(rows), exc)
                return SpanExportResult.FAILURE
            _offer_to_fleet(rows)
            return SpanExportResult.SUCCESS

    return LocalExporter()


def _offer_to_fleet(rows: Sequence[tuple[Any, ...]]) -> None:
    """Hand the spans to the telemetry uplink (a no-op without a fleet), which samples
    them by trace id."""
    from edgeos.telemetry.buffer import enqueue

    for trace, span, parent, name, start, end, status, attributes in rows:
        record = {
            "trace_id": trace, "span_id": span, "parent_id": parent, "name": name,
            "start_ns": start, "end_ns": end, "status": status,
            "attributes": json.loads(attributes),
        }  # fmt: skip
        try:
            enqueue("trace", record, at=start / 1e9, trace_id=trace)
        except Exception as exc:  # the uplink's buffer refused: the local copy is kept
            log.warning("a span was not offered to the fleet: %s", exc)
            return


def _row(span: ReadableSpan) -> tuple[Any, ...]:
    context = span.context
    assert context is not None
    parent = span.parent
    return (
        f"{context.trace_id:032x}",
        f"{context.span_id:016x}",
        f"{parent.span_id:016x}" if parent is not None else None,
        span.name,
        span.start_time or 0,
        span.end_time or span.start_time or 0,
        span.status.status_code.name.lower(),
        json.dumps(dict(span.attributes or {}), sort_keys=True),
    )


@dataclass(frozen=True)
class SpanRecord:
    """A span as the node keeps it."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start_ns: int
    end_ns: int
    status: str
    attributes: dict[str, Any]
    #: How deep in its trace's tree (the root is 0), as :func:`timeline` orders them.
    depth: int = 0

    @property
    def duration_ms(self) -> float:
        """How long the span lasted."""
        return (self.end_ns - self.start_ns) / 1e6

    def to_json(self) -> dict[str, Any]:
        """The span for an API answer."""
        return {
            "trace_id": self.trace_id, "span_id": self.span_id, "parent_id": self.parent_id,
            "name": self.name, "start": self.start_ns / 1e9,
            "duration_ms": round(self.duration_ms, 3), "status": self.status,
            "depth": self.depth, "attributes": self.attributes,
        }  # fmt: skip


def spans_of_trace(conn: sqlite3.Connection, trace: str) -> list[SpanRecord]:
    """The kept spans of one trace, as a timeline: parents before their children, siblings
    by start time. An empty list when tracing was off (or the spans are gone)."""
    rows = conn.execute(
        "SELECT trace_id, span_id, parent_id, name, start_ns, end_ns, status, attributes "
        "FROM spans WHERE trace_id = ? ORDER BY start_ns, seq",
        (trace,),
    ).fetchall()
    spans = [
        SpanRecord(
            trace_id=row[0], span_id=row[1], parent_id=row[2], name=row[3], start_ns=row[4],
            end_ns=row[5], status=row[6], attributes=json.loads(row[7]),
        )
        for row in rows
    ]  # fmt: skip
    return timeline(spans)


def timeline(spans: Sequence[SpanRecord]) -> list[SpanRecord]:
    """Spans in tree order with their depth; a span whose parent is not kept is a root."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for span in sorted(spans, key=lambda s: (s.start_ns, s.end_ns)):
        parent = span.parent_id if span.parent_id in ids else None
        children.setdefault(parent, []).append(span)
    ordered: list[SpanRecord] = []

    def visit(parent: str | None, depth: int) -> None:
        for span in children.get(parent, []):
            ordered.append(SpanRecord(**{**span.__dict__, "depth": depth}))
            visit(span.span_id, depth + 1)

    visit(None, 0)
    return ordered
