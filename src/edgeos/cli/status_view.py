"""``edgeos node status``: ask the running node, or read its database; show the snapshot."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from edgeos.cli.common import console, err_console, size
from edgeos.errors import AuthenticationError, NotFoundError, UnavailableError
from edgeos.node.status import FleetLink, NodeStatus, TelemetryState, collect_status
from edgeos.settings import NodeSettings
from edgeos.state import Database


def ask_node(url: str, token: str | None, certificate: Path | None = None) -> NodeStatus | None:
    """The running node's snapshot, asked with ``token``; None when nothing answers at
    ``url``. Over HTTPS the node must present ``certificate``, its own (pinned)."""
    import httpx

    from edgeos.node.tokens import bearer
    from edgeos.security.tls import pinned_context

    verify = True if certificate is None else pinned_context(certificate)
    try:
        response = httpx.get(f"{url}/api/status", headers=bearer(token), timeout=5.0, verify=verify)
    except httpx.TransportError:
        return None
    if response.status_code in (401, 403):
        raise AuthenticationError(
            f"{url} refused GET /api/status: {response.json().get('error')}; run this as the "
            "node's user, or set EDGEOS_NODE_TOKEN to a token with the read scope"
        )
    if response.status_code != 200:
        raise UnavailableError(
            f"{url} answered GET /api/status with {response.status_code}: not an edgeos node, "
            "or one older than this command"
        )
    return NodeStatus.from_json(response.json())


def say_not_running(url: str, settings: NodeSettings) -> None:
    """Tell (on stderr, so ``--json`` output stays clean) where the snapshot comes from."""
    err_console.print(
        f"node not running: no answer at {url}; reading {settings.database_path}",
        highlight=False,
    )


def read_node(settings: NodeSettings) -> NodeStatus:
    """A snapshot from the database, for a node that is not running."""
    if not settings.database_path.exists():
        raise NotFoundError(
            f"no node database at {settings.database_path}: no node has run with this data "
            "directory (give --data-dir, or EDGEOS_DATA_DIR)"
        )
    with Database(settings.database_path) as db:
        return collect_status(db, settings, running=False)


def show(s: NodeStatus) -> None:
    """The snapshot, readable in a terminal."""
    if s.running:
        state = f"[green]running[/] (pid {s.pid}), up {_duration(s.uptime_seconds or 0)}"
        console.print(f"[bold]edgeos {s.version}[/] node {state}, API at {s.listen}")
    else:
        console.print(f"[bold]edgeos {s.version}[/] node [red]not running[/]")
    # What a node reports (names, paths, error messages) is shown as text, never as markup.
    console.print(f"data directory: {s.data_dir}", markup=False, highlight=False)
    named = ", ".join(f"{n} {state}" for state, n in sorted(s.api_tokens.items())) or "none"
    console.print(f"API tokens: the local one, and named: {named}", highlight=False)
    console.print(f"fleet: {s.fleet}", markup=False, highlight=False)
    if s.fleet_link is not None:
        show_fleet(s.fleet_link)

    agents = Table("agent", "version", "state", "runs", title="agents", title_justify="left")
    for a in s.agents:
        runs = ", ".join(f"{n} {state}" for state, n in sorted(a.runs.items())) or "none"
        agents.add_row(escape(a.name), escape(a.version), "paused" if a.paused else "active", runs)
    console.print(agents if s.agents else "agents: none installed")

    loaded = {(m.name, m.version): m for m in s.models_loaded}
    models = Table("model", "versions", "default", "loaded", title="models", title_justify="left")
    for r in s.models_registered:
        here = [m for (name, _), m in loaded.items() if name == r.name]
        shown = ", ".join(f"{m.version} on {'/'.join(m.providers)}" for m in here)
        models.add_row(
            escape(r.name), str(r.versions), escape(r.default or ""), escape(shown or "-")
        )
    console.print(models if s.models_registered else "models: none registered")

    usage = Table("", "by part", "total", title="resources", title_justify="left")
    if s.memory:
        parts = ", ".join(f"{p} {size(n)}" for p, n in s.memory.items())
        limits = [f"model budget {size(s.model_budget_bytes)}"]
        if s.memory_budget_bytes:
            limits.append(f"node budget {size(s.memory_budget_bytes)}")
        if s.memory_limit_bytes:
            limits.append(f"MemoryMax {size(s.memory_limit_bytes)}")
        usage.add_row("memory", f"{parts} ({'; '.join(limits)})", size(s.memory.get("process", 0)))
    else:
        usage.add_row("memory", "not measured: the node is not running", "")
    disk = ", ".join(f"{p} {size(n)}" for p, n in s.disk.items())
    usage.add_row("disk", disk, size(sum(s.disk.values())))
    if s.database:
        parts = ", ".join(f"{p} {size(n)}" for p, n in s.database.items())
        usage.add_row("database", parts, size(sum(s.database.values())))
    box = s.buffers.outbox
    usage.add_row(
        "buffers",
        f"outbox {box.get('pending', 0)} pending, {box.get('delivered', 0)} delivered, "
        f"{box.get('dead', 0)} dead; {s.buffers.open_escalations} open escalations"
        + _outbound(s.buffers.outbound, s.buffers.outbound_dropped),
        "",
    )
    console.print(usage)

    if not s.last_errors:
        console.print("last errors: none")
        return
    errors = Table("when", "what", "error", title="last errors", title_justify="left")
    for e in s.last_errors:
        when = "" if e.at is None else datetime.fromtimestamp(e.at).strftime("%Y-%m-%d %H:%M:%S")
        errors.add_row(when, escape(e.source), escape(e.message))
    console.print(errors)


def show_fleet(link: FleetLink) -> None:
    """The fleet link's details and what the fleet deployed here."""
    facts = [
        ("last sync", _when(link.last_sync)),
        (f"{link.link} since", _when(link.link_since)),
        ("certificate expires", _when(link.certificate_expires)),
    ]
    if link.last_error and link.link == "online":  # otherwise the summary line says it
        facts.append(("last error", link.last_error))
    if link.telemetry is not None:
        facts.append(("telemetry", _telemetry(link.telemetry)))
    if link.memory is not None:
        m = link.memory
        confirmed = f", confirmed {_when(m.confirmed_at)}" if m.confirmed_at else ""
        behind = "in step" if not m.behind else f"{m.behind} change(s) behind"
        facts.append(("memory replication", f"fleet at {m.fleet_position} of {m.local_seq}, "
                                            f"{behind}{confirmed}"))  # fmt: skip
    for label, value in facts:
        console.print(f"  {label}: {value}", markup=False, highlight=False)
    if not link.artifacts:
        console.print("  deployed: nothing yet", highlight=False)
        return
    table = Table(
        "artifact", "version", "state", "previous", "reason", title="deployed by the fleet",
        title_justify="left",
    )  # fmt: skip
    for a in link.artifacts:
        state = a.state if a.assigned else f"{a.state} (unassigned)"
        table.add_row(
            escape(f"{a.kind}/{a.name}"), escape(a.version), state,
            escape(a.previous_version or "-"), escape(a.reason or ""),
        )  # fmt: skip
    console.print(table)


def _outbound(waiting: dict[str, int], dropped: dict[str, int]) -> str:
    """The outbound queue for cloud services, when it holds or dropped anything."""
    if not waiting and not dropped:
        return ""
    held = ", ".join(f"{n} {k}" for k, n in sorted(waiting.items())) or "empty"
    lost = ", ".join(f"{n} {k}" for k, n in sorted(dropped.items()))
    return f"; outbound {held}" + (f" (dropped {lost})" if lost else "")


def _telemetry(t: TelemetryState) -> str:
    """The uplink's buffer on one line: waiting by kind, in flight, dropped, acknowledged."""
    waiting = ", ".join(
        f"{t.records[k]} {k} ({size(t.bytes.get(k, 0))})" for k in sorted(t.records)
    )
    parts = [f"buffer {waiting or 'empty'}"]
    if t.pending_batch is not None:
        p = t.pending_batch
        parts.append(f"batch {p.seq} in flight ({p.records} records, {size(p.bytes)}) "
                     f"since {_when(p.since)}")  # fmt: skip
    if t.dropped:
        parts.append("dropped " + ", ".join(f"{n} {k}" for k, n in sorted(t.dropped.items())))
    acked = t.last_acknowledged_seq
    parts.append(
        "no batch acknowledged yet" if acked is None else f"last acknowledged batch {acked}"
    )
    parts.append(f"{size(t.sent_today_bytes)} sent today")
    return "; ".join(parts)


def _when(at: float | None) -> str:
    return "never" if at is None else datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
