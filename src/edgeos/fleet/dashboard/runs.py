"""Runs on the dashboard: a device's recent runs, and one run's trace and journal outline.

Devices send, for every finished run, a ``log`` record whose data is the run's outline
(``type`` ``"run"``: agent, state, times, counts and a whitelisted journal, never
payloads), and the spans of the traces their sampling keeps (``trace`` records). Both
are stored as telemetry events (kept :data:`~edgeos.fleet.telemetry_store.EVENT_RETENTION_S`).
Records are what a device said: they are read defensively (a malformed one is skipped)
and everything shown is escaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgeos.errors import NotFoundError
from edgeos.fleet import devices, tables
from edgeos.fleet.auth import Operator
from edgeos.fleet.dashboard.charts import Bar, timeline
from edgeos.fleet.dashboard.render import badge, esc, link, table, url, when
from edgeos.telemetry.tracing import SpanRecord
from edgeos.telemetry.tracing import timeline as tree_order

#: Runs listed on a device's page.
RECENT_RUNS = 20
#: Spans drawn for one run at most.
MAX_SPANS = 400
# Outlines and spans are stored as the device's JSON; their first key says what they are.
_RUN_PREFIX = '{"type":"run","run_id":'
_SPAN_PREFIX = '{"trace_id":'
_ID = re.compile(r"[0-9A-Za-z-]{1,64}")
_E = tables.telemetry_events


@dataclass(frozen=True)
class RunOutline:
    """A finished run as its device outlined it."""

    run_id: str
    trace_id: str
    agent: str
    version: str
    trigger: str
    state: str
    started_at: float
    finished_at: float
    steps: int
    effects: int
    escalations: int
    overrides: int
    failures: int
    cost: float
    journal: list[dict[str, Any]]

    @property
    def duration_s(self) -> float:
        """How long the run took, start to finish (waiting for people included)."""
        return max(self.finished_at - self.started_at, 0.0)

    def summary(self) -> str:
        """What the run decided, in counts: steps, effects, escalations, overrides."""

        def n(count: int, what: str) -> str:
            return f"{count} {what}{'' if count == 1 else 's'}"

        parts = [n(self.steps, "step"), n(self.effects, "effect")]
        if self.escalations:
            parts.append(n(self.escalations, "escalation"))
        if self.overrides:
            parts.append(n(self.overrides, "override"))
        if self.failures:
            parts.append(n(self.failures, "failed attempt"))
        return ", ".join(parts)


def _outline(text: str) -> RunOutline | None:
    """The outline in a stored record, or None when it is not one."""
    try:
        data = orjson.loads(text)
        journal = [e for e in data.get("journal") or [] if isinstance(e, dict)]
        return RunOutline(
            run_id=str(data["run_id"]), trace_id=str(data.get("trace_id") or ""),
            agent=str(data["agent"]), version=str(data.get("version") or ""),
            trigger=str(data.get("trigger") or ""), state=str(data["state"]),
            started_at=float(data["started_at"]), finished_at=float(data["finished_at"]),
            steps=int(data.get("steps") or 0), effects=int(data.get("effects") or 0),
            escalations=int(data.get("escalations") or 0),
            overrides=int(data.get("overrides") or 0), failures=int(data.get("failures") or 0),
            cost=float(data.get("cost") or 0.0), journal=journal,
        )  # fmt: skip
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None


def recent_runs(conn: Connection, device_id: str, limit: int = RECENT_RUNS) -> list[RunOutline]:
    """The device's latest finished runs, newest first."""
    rows = conn.execute(
        sa.select(_E.c.data)
        .where(_E.c.device_id == device_id, _E.c.kind == "log", _E.c.data.like(f"{_RUN_PREFIX}%"))
        .order_by(_E.c.at.desc(), _E.c.id.desc())
        .limit(limit)
    )
    return [o for o in (_outline(text) for (text,) in rows) if o is not None]


def find_run(conn: Connection, device_id: str, run_id: str) -> RunOutline:
    """One run of the device; NotFoundError when its outline did not reach the fleet."""
    if _ID.fullmatch(run_id):
        text = conn.execute(
            sa.select(_E.c.data)
            .where(_E.c.device_id == device_id, _E.c.kind == "log",
                   _E.c.data.like(f'{_RUN_PREFIX}"{run_id}",%'))
            .order_by(_E.c.id.desc()).limit(1)
        ).scalar()  # fmt: skip
        found = None if text is None else _outline(text)
        if found is not None and found.run_id == run_id:
            return found
    raise NotFoundError(f"no run {run_id} of device {device_id} at the fleet (outlines are "
                        "kept for 7 days)")  # fmt: skip


def spans_of(conn: Connection, device_id: str, run: RunOutline) -> list[SpanRecord]:
    """The spans of the run's trace the device sent, in tree order."""
    if not re.fullmatch(r"[0-9a-f]{32}", run.trace_id):
        return []
    rows = conn.execute(
        sa.select(_E.c.data)
        .where(_E.c.device_id == device_id, _E.c.kind == "trace",
               _E.c.at >= run.started_at - 60,
               _E.c.data.like(f'{_SPAN_PREFIX}"{run.trace_id}",%'))
        .order_by(_E.c.at).limit(MAX_SPANS)
    )  # fmt: skip
    spans = []
    for (text,) in rows:
        try:
            d = orjson.loads(text)
            spans.append(SpanRecord(
                trace_id=str(d["trace_id"]), span_id=str(d["span_id"]),
                parent_id=None if d.get("parent_id") is None else str(d["parent_id"]),
                name=str(d["name"]), start_ns=int(d["start_ns"]), end_ns=int(d["end_ns"]),
                status=str(d.get("status") or ""),
                attributes=d["attributes"] if isinstance(d.get("attributes"), dict) else {},
            ))  # fmt: skip
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            continue
    # A span sent twice (a batch re-sent after a lost acknowledgement) is drawn once.
    unique = {s.span_id: s for s in spans}
    return tree_order(list(unique.values()))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def runs_table(found: list[RunOutline], device_id: str) -> str:
    """The table of runs on a device's page."""
    rows = [
        [link(url("devices", device_id, "runs", r.run_id), r.run_id[:13]),
         esc(f"{r.agent}@{r.version}" if r.version else r.agent), badge(r.state),
         esc(when(r.started_at)), esc(_ms(r.duration_s)), esc(r.summary())]
        for r in found
    ]  # fmt: skip
    return table(["run", "agent", "state", "started", "duration", "decision"], rows,
                 "no finished run reported yet")  # fmt: skip


def _details(entry: dict[str, Any]) -> str:
    shown = {k: v for k, v in entry.items() if k not in ("kind", "at_s", "step")}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def run_page(
    conn: Connection, op: Operator, csrf: str, device_id: str, run_id: str
) -> tuple[str, str]:
    """One run: its facts, its trace as a timeline, its journal outline."""
    d = devices.show_device(conn, device_id)
    run = find_run(conn, device_id, run_id)
    host = d["inventory"].get("hostname") or device_id
    facts = [
        ("run", f"<code>{esc(run.run_id)}</code>"), ("device", link(url("devices", device_id), host)),
        ("agent", esc(f"{run.agent}@{run.version}")), ("trigger", esc(run.trigger)),
        ("state", badge(run.state)), ("started", esc(when(run.started_at))),
        ("duration", esc(_ms(run.duration_s))), ("decision", esc(run.summary())),
        ("cost", esc(f"{run.cost:.4f}")), ("trace", f"<code>{esc(run.trace_id)}</code>"),
    ]  # fmt: skip
    spans = spans_of(conn, device_id, run)
    bars = [Bar(s.name, s.depth, s.start_ns / 1e9, s.end_ns / 1e9, s.status == "error")
            for s in spans]  # fmt: skip
    trace = (
        timeline(f"{len(spans)} spans", bars)
        if spans
        else '<p class="muted">no span of this run reached the fleet (devices send a sample '
        "of traces: the node setting telemetry_trace_percent)</p>"
    )
    journal = table(["at", "record", "step", "details"], [
        [esc(f"+{float(e.get('at_s') or 0):.3f} s"), esc(e.get("kind")), esc(e.get("step") or ""),
         f'<span class="detail">{esc(_details(e))}</span>']
        for e in run.journal
    ], "no journal outline")  # fmt: skip
    body = (
        '<div class="cards"><section class="card"><h2>Run</h2><dl>'
        + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
        + "</dl></section></div>"
        + f"<h2>Trace</h2>{trace}<h2>Journal</h2>{journal}"
    )
    return f"{run.agent} run", body
