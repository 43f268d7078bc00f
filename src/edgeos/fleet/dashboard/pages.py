"""The dashboard's pages: each reads in one transaction and returns a title and a body.

Read access is checked by the caller; what only a stronger scope may do (forms that
change something, the audit log) is shown to operators who have that scope, and the
handlers behind the forms check it again.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgeos.errors import ConfigError
from edgeos.fleet import approvals, devices, tables, telemetry_store
from edgeos.fleet.artifacts import list_artifacts
from edgeos.fleet.auth import Operator
from edgeos.fleet.dashboard import runs
from edgeos.fleet.dashboard.charts import Series, line_chart
from edgeos.fleet.dashboard.render import badge, esc, form, link, table, url, when
from edgeos.fleet.db import FleetDatabase
from edgeos.fleet.rollouts import OPEN_STATES, list_rollouts, rollout_status

#: A device that has not synced for this many sync intervals counts as offline.
OFFLINE_AFTER_INTERVALS = 3
#: The most devices the overview lists (the counts cover all).
OVERVIEW_ROWS = 200
#: The KPI charts cover this much time, in buckets of this size.
KPI_WINDOW_S = 6 * 3600
KPI_BUCKET_S = 300

Page = tuple[str, str]


def _online(device: dict[str, Any], now: float, interval_s: float) -> bool:
    seen = device["last_seen"]
    return seen is not None and now - seen <= OFFLINE_AFTER_INTERVALS * interval_s


def _counts(title: str, counter: Counter[str]) -> str:
    items = "".join(f"<li><span>{esc(k)}</span><b>{n}</b></li>" for k, n in counter.most_common(8))
    return f'<section class="card"><h2>{esc(title)}</h2><ul class="counts">{items}</ul></section>'


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def kpis(db: FleetDatabase, *, device_id: str | None = None) -> str:
    """Charts of the KPIs devices sent over the last hours (fleet-wide percentiles come
    from merged sketches), and the same KPIs per agent."""
    end = (time.time() // 60 + 1) * 60
    start = end - KPI_WINDOW_S
    try:
        points = telemetry_store.kpi_series(
            db, start=start, end=end, bucket_s=KPI_BUCKET_S, device_id=device_id
        )
        by_agent = telemetry_store.kpi_by(db, "agent", start=start, end=end, device_id=device_id)
    except ConfigError as exc:  # too much to chart at once: say so rather than fail the page
        return f'<p class="muted">KPIs not shown: {esc(exc)}</p>'
    if not points:
        return '<p class="muted">no KPIs received in the last hours</p>'
    mid = KPI_BUCKET_S / 2

    def line(name: str, field: str) -> Series:
        return Series(name, [(p.start + mid, getattr(p, field)) for p in points])

    charts = (
        line_chart("Decision latency, ms", [line("p50", "decision_p50_ms"),
                   line("p99", "decision_p99_ms")], start=start, end=end)
        + line_chart("Inference latency, ms", [line("p50", "inference_p50_ms"),
                     line("p99", "inference_p99_ms")], start=start, end=end)
        + line_chart("Success and override rate", [line("success", "success_rate"),
                     line("override", "override_rate")], start=start, end=end, percent=True)
    )  # fmt: skip
    rows = [
        [esc(agent), esc(p.runs), esc(_pct(p.success_rate)), esc(_pct(p.override_rate)),
         esc(_num(p.decision_p50_ms)), esc(_num(p.decision_p99_ms)),
         esc(_num(p.cost_per_decision, 4)), esc(_num(p.drift, 3))]
        for agent, p in by_agent.items()
    ]  # fmt: skip
    return f'<div class="charts">{charts}</div>' + table(
        ["agent", "runs", "success", "overrides", "decision p50 ms", "decision p99 ms",
         "cost / decision", "drift"], rows, "no agent KPIs")  # fmt: skip


def overview(
    conn: Connection, op: Operator, csrf: str, *, interval_s: float, db: FleetDatabase
) -> Page:
    """Devices online and offline by last sync, versions, health, groups; open approvals."""
    now = time.time()
    found = devices.list_devices(conn, limit=1_000_000)
    online = Counter("online" if _online(d, now, interval_s) else "offline"
                     for d in found if d["status"] == "active")  # fmt: skip
    online.update("revoked" for d in found if d["status"] != "active")
    versions = Counter(str(d["inventory"].get("edgeos_version", "unknown")) for d in found)
    health = Counter(str(d["health"].get("status", "unknown")) for d in found)
    groups = Counter(d["group"] for d in found)
    waiting = len(approvals.list_escalations(conn, state="open"))
    cards = (
        _counts("Devices", online) + _counts("edgeos versions", versions)
        + _counts("Health", health) + _counts("Groups", groups)
    )  # fmt: skip
    note = ""
    if waiting:
        note = f'<p class="notice">{link(url("approvals"), f"{waiting} approval(s) waiting")}</p>'
    rows = [
        [
            link(url("devices", d["id"]), d["inventory"].get("hostname") or d["id"]),
            f'<code>{esc(d["id"])}</code>', esc(d["group"]),
            badge("online" if _online(d, now, interval_s) else "offline")
            if d["status"] == "active" else badge(d["status"]),
            badge(d["health"].get("status", "unknown")),
            esc(d["inventory"].get("edgeos_version", "-")), esc(when(d["last_seen"])),
        ]
        for d in found[:OVERVIEW_ROWS]
    ]  # fmt: skip
    more = (
        f'<p class="muted">first {OVERVIEW_ROWS} of {len(found)}</p>'
        if len(found) > OVERVIEW_ROWS
        else ""
    )
    body = (
        f'{note}<div class="cards">{cards}</div>'
        + f"<h2>Fleet KPIs, last {KPI_WINDOW_S // 3600} hours</h2>{kpis(db)}"
        + f"<h2>Devices ({len(found)})</h2>"
        + table(["host", "id", "group", "link", "health", "edgeos", "last sync"], rows,
                "no device enrolled yet")
        + more
    )  # fmt: skip
    return "Fleet", body


def _artifact_rows(shown: dict[str, Any]) -> list[list[str]]:
    desired = {(a["kind"], a["name"]): a for a in shown["assignments"]}
    actual = {(a["kind"], a["name"]): a for a in shown["actual"]}
    rows = []
    for key in sorted(set(desired) | set(actual)):
        want, have = desired.get(key), actual.get(key)
        want_v = want["version"] if want else None
        have_v = have["version"] if have else None
        if have and have["state"] == "failed":
            state = badge("failed")
        elif want_v == have_v:
            state = badge("in sync", "ok")
        else:
            state = badge("pending")
        rows.append([
            esc(f"{key[0]}/{key[1]}"), esc(want_v or "-"), esc(have_v or "-"), state,
            esc((have or {}).get("reason") or ""),
        ])  # fmt: skip
    return rows


def device(
    conn: Connection, op: Operator, csrf: str, device_id: str, *, interval_s: float,
    db: FleetDatabase,
) -> Page:  # fmt: skip
    """One device: inventory, health, KPIs, artifacts desired against actual, recent runs,
    approvals, audit."""
    d = devices.show_device(conn, device_id)
    inv, health = d["inventory"], d["health"]
    status = badge("online" if _online(d, time.time(), interval_s) else "offline")
    facts = [
        ("id", f"<code>{esc(d['id'])}</code>"), ("group", esc(d["group"])),
        ("status", badge(d["status"])), ("link", status), ("last sync", esc(when(d["last_seen"]))),
        ("enrolled", esc(when(d["enrolled_at"]))),
        ("labels", esc(", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "-")),
        *((esc(k.replace("_", " ")), esc(", ".join(v) if isinstance(v, list) else v))
          for k, v in inv.items()),
    ]  # fmt: skip
    health_facts = [
        (esc(k.replace("_", " ")), esc(when(v) if k == "since" and v else "-" if v is None else v))
        for k, v in health.items()
    ]
    escalations = approvals.list_escalations(conn, device_id=device_id, limit=20)
    body = (
        '<div class="cards"><section class="card"><h2>Device</h2><dl>'
        + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
        + '</dl></section><section class="card"><h2>Health</h2><dl>'
        + ("".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in health_facts) or "<dd>no report yet</dd>")
        + "</dl></section></div>"
        + f"<h2>KPIs, last {KPI_WINDOW_S // 3600} hours</h2>{kpis(db, device_id=device_id)}"
        + "<h2>Artifacts: desired and actual</h2>"
        + table(["artifact", "desired", "actual", "state", "reason"], _artifact_rows(d),
                "nothing assigned or running")
        + "<h2>Recent runs</h2>" + runs.runs_table(runs.recent_runs(conn, device_id), device_id)
        + "<h2>Escalations</h2>" + _escalation_table(escalations, op, csrf)
    )  # fmt: skip
    if "admin" in op.scopes:
        a = tables.audit
        rows = conn.execute(
            sa.select(a).where(sa.or_(a.c.target.like(f"device/{device_id}%"),
                                      a.c.actor == f"device:{device_id}"))
            .order_by(a.c.id.desc()).limit(20)
        ).mappings()  # fmt: skip
        body += "<h2>Recent audit</h2>" + _audit_table(rows)
    return str(inv.get("hostname") or device_id), body


def _answer_form(e: dict[str, Any], csrf: str) -> str:
    options = "".join(
        f'<option value="{esc(o)}"{" selected" if o == e["proposal"] else ""}>{esc(o)}</option>'
        for o in e["options"]
    )
    fields = (
        f'<input type="hidden" name="device_id" value="{esc(e["device_id"])}">'
        f'<input type="hidden" name="escalation_id" value="{esc(e["id"])}">'
        f'<select name="choice" aria-label="answer">{options}</select>'
        '<input type="text" name="note" placeholder="note (optional)" maxlength="1000">'
    )
    return form(url("approvals", "answer"), csrf, fields, "Answer")


def _escalation_table(found: list[dict[str, Any]], op: Operator, csrf: str) -> str:
    can_answer = "deploy" in op.scopes
    rows = [
        [
            link(url("devices", e["device_id"]), e["device_id"][:13]), esc(e["agent"]),
            f'<span class="question">{esc(e["question"])}</span>',
            esc(", ".join(map(str, e["options"]))), esc(e["proposal"]), esc(when(e["deadline"])),
            badge(e["state"]),
            _answer_form(e, csrf) if e["state"] == "open" and can_answer
            else esc(e["answer"] if e["answer"] is not None else e.get("detail") or ""),
        ]
        for e in found
    ]  # fmt: skip
    return table(["device", "agent", "question", "options", "proposal", "deadline", "state",
                  "answer"], rows, "no escalation")  # fmt: skip


def approvals_inbox(conn: Connection, op: Operator, csrf: str) -> Page:
    """Open escalations to answer, then the latest others."""
    waiting = approvals.list_escalations(conn, state="open")
    recent = [e for e in approvals.list_escalations(conn, limit=100) if e["state"] != "open"]
    note = (
        "" if "deploy" in op.scopes else '<p class="notice">Answering needs the deploy scope.</p>'
    )
    body = (
        f"{note}<h2>Waiting ({len(waiting)})</h2>" + _escalation_table(waiting, op, csrf)
        + "<h2>Recent</h2>" + _escalation_table(recent[:50], op, csrf)
    )  # fmt: skip
    return "Approvals", body


def rollouts(conn: Connection, op: Operator, csrf: str) -> Page:
    """Every rollout, newest first."""
    rows = [
        [link(url("rollouts", r["id"]), r["id"]), esc(r["artifact"]), esc(r["target"]),
         badge(r["status"]), esc(f"{r['current_wave']} of {len(r['waves'])}"), esc(r["devices"]),
         esc(when(r["updated_at"]))]
        for r in list_rollouts(conn)
    ]  # fmt: skip
    return "Rollouts", table(["id", "artifact", "target", "state", "wave", "devices", "updated"],
                             rows, "no rollout yet")  # fmt: skip


def rollout(conn: Connection, op: Operator, csrf: str, rollout_id: str) -> Page:
    """One rollout wave by wave, with pause, resume and abort for deploy operators."""
    r = rollout_status(conn, rollout_id)
    waves = [
        [esc(w["number"]), esc(f"{w['percent']}%"), esc(w["devices"]), badge(w["state"]),
         esc(w["active"]), esc(w["failed"]), esc(w["pending"]),
         esc((w["verdict"] or {}).get("reason") or "")]
        for w in r["wave_list"]
    ]  # fmt: skip
    actions = ""
    if "deploy" in op.scopes and r["status"] in OPEN_STATES:
        act = (
            [("pause", "Halt (pause)", False)]
            if r["status"] == "running"
            else [("resume", "Resume", False)]
        )
        act.append(("abort", "Abort and roll back", True))
        actions = '<div class="actions">' + "".join(
            form(url("rollouts", rollout_id, name), csrf, "", label, danger=danger)
            for name, label, danger in act
        ) + "</div>"  # fmt: skip
    soak = r["soak_remaining_s"]
    facts = [
        ("artifact", esc(r["artifact"])), ("target", esc(r["target"])), ("state", badge(r["status"])),
        ("wave", esc(f"{r['current_wave']} of {len(r['waves'])}")),
        ("soak left", esc("-" if soak is None else f"{soak:.0f} s")),
        ("gates", esc(", ".join(r["gates"]) or "-")), ("reason", esc(r["reason"] or "-")),
        ("created", esc(f"{when(r['created_at'])} by {r['created_by']}")),
    ]  # fmt: skip
    body = (
        actions + '<section class="card"><dl>'
        + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl></section>"
        + "<h2>Waves</h2>"
        + table(["wave", "share", "devices", "state", "active", "failed", "pending", "gate"], waves)
    )  # fmt: skip
    return f"Rollout {rollout_id}", body


def artifacts(conn: Connection, op: Operator, csrf: str) -> Page:
    """Published artifacts."""
    rows = [
        [esc(a["kind"]), esc(a["name"]), esc(a["version"]), f'<code>{esc(a["sha256"][:16])}</code>',
         esc(a["length"]), esc(when(a["published_at"])), esc(a["published_by"])]
        for a in list_artifacts(conn)
    ]  # fmt: skip
    return "Artifacts", table(["kind", "name", "version", "sha256", "bytes", "published", "by"],
                              rows, "nothing published yet")  # fmt: skip


def _audit_table(rows: Any) -> str:
    return table(
        ["when", "actor", "action", "target", "outcome", "detail"],
        ([esc(when(r["at"])), esc(r["actor"]), esc(r["action"]), esc(r["target"]),
          badge(r["outcome"]), f'<span class="detail">{esc(r["detail"] or "")}</span>']
         for r in rows),
    )  # fmt: skip


def audit(conn: Connection, op: Operator, csrf: str) -> Page:
    """The latest audit records (the admin scope is checked by the caller)."""
    a = tables.audit
    rows = conn.execute(sa.select(a).order_by(a.c.id.desc()).limit(200)).mappings()
    return "Audit log", _audit_table(rows)
