"""``edgeos agent|runs|journal|approvals ...``: agents, their runs, the audit trail, people."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from edgeos.agents import manage, store
from edgeos.cli import runs_migrate_cmd
from edgeos.cli.common import DataDirOption, console, node_settings
from edgeos.errors import InvalidRequestError
from edgeos.runtime import ModelRegistry
from edgeos.settings import NodeSettings
from edgeos.state import Database, journal
from edgeos.telemetry import tracing

if TYPE_CHECKING:
    from edgeos.connectors.contracts import Contract

agent_app = typer.Typer(help="Install, steer and run agents.", no_args_is_help=True)
runs_app = typer.Typer(help="Inspect, audit and replay runs.", no_args_is_help=True)
journal_app = typer.Typer(help="Check the append-only journal.", no_args_is_help=True)
approvals_app = typer.Typer(help="Questions agents asked people.", no_args_is_help=True)


@contextmanager
def _db(data_dir: Path | None) -> Iterator[tuple[Database, NodeSettings]]:
    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        yield db, settings


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _bound_connectors(settings: NodeSettings) -> tuple[list[str], dict[str, Contract]]:
    """The bindings' names, and the contract of each that implements one."""
    from edgeos.connectors.config import load_connectors
    from edgeos.connectors.contracts import node_contracts

    path = settings.data_dir / "connectors.yaml"
    if not path.exists():
        return [], {}
    bindings = load_connectors(path)
    return list(bindings), node_contracts(settings.data_dir, bindings)


# -- agent -----------------------------------------------------------------------------
@agent_app.command("add")
def add(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory with agent.yaml.")],
    data_dir: DataDirOption = None,
) -> None:
    """Check a bundle completely and install it (nothing is installed if any check fails)."""
    with _db(data_dir) as (db, settings):
        models = {m.name for m, _ in ModelRegistry(db, settings.model_store).catalog()}
        connectors, contracts = _bound_connectors(settings)
        agent = manage.add_agent(
            db,
            bundle,
            settings.data_dir / "agents",
            models=models,
            connectors=connectors,
            contracts=contracts,
        )
    console.print(f"installed agent [bold]{agent.name}[/] {agent.version}")


@agent_app.command("list")
def list_agents(data_dir: DataDirOption = None) -> None:
    """List installed agents and their runs by state."""
    with _db(data_dir) as (db, _):
        rows = [(a, store.state_counts(db, a.name)) for a in store.agents(db)]
    table = Table("name", "version", "state", "triggers", "runs")
    for agent, counts in rows:
        triggers = ", ".join(t.kind for t in agent.manifest.triggers)
        runs = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
        table.add_row(
            agent.name, agent.version, "paused" if agent.paused else "active", triggers, runs
        )
    console.print(table if rows else "no agents installed")


@agent_app.command()
def pause(name: str, data_dir: DataDirOption = None) -> None:
    """Stop starting runs; running ones park at their next step."""
    with _db(data_dir) as (db, _):
        manage.set_paused(db, name, True)
    console.print(f"agent {name} paused")


@agent_app.command()
def resume(name: str, data_dir: DataDirOption = None) -> None:
    """Start runs again; parked runs continue where they stopped."""
    with _db(data_dir) as (db, _):
        manage.set_paused(db, name, False)
    console.print(f"agent {name} resumed")


@agent_app.command()
def remove(name: str, data_dir: DataDirOption = None) -> None:
    """Uninstall an agent that has no unfinished runs."""
    with _db(data_dir) as (db, _):
        manage.remove_agent(db, name)
    console.print(f"agent {name} removed")


@agent_app.command("run")
def run_agent(
    name: str,
    input_json: Annotated[str, typer.Option("--input", help="The run's input, as JSON.")] = "null",
    data_dir: DataDirOption = None,
) -> None:
    """Start a run by hand; the node takes it within a second."""
    try:
        data = json.loads(input_json)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"--input is not valid JSON: {exc}") from exc
    with _db(data_dir) as (db, _):
        run_id = manage.queue_run(db, name, data)
    console.print(run_id)


@agent_app.command()
def stats(name: str, data_dir: DataDirOption = None) -> None:
    """Decision latency, success rate, override rate, cost per decision, time to recovery,
    and drift of what its models see."""
    from edgeos.agents.kpis import agent_kpis
    from edgeos.agents.learning import drift, models_observed

    with _db(data_dir) as (db, _):
        store.agent(db, name)
        kpis = agent_kpis(db, name)
        reports = [drift(db, name, model) for model in models_observed(db, name)]
    table = Table("measure", "value", title=f"agent {name}")
    for label, value in kpis.rows():
        table.add_row(label, value)
    for r in reports:
        if r.worst is None:
            value = f"not enough observations yet ({r.reference_n} + {r.recent_n})"
        else:
            value = f"PSI {r.worst:.3f}" + (" [bold red]DRIFT[/]" if r.drifting else " stable")
        table.add_row(f"drift of {r.model}", value)
    console.print(table)


@agent_app.command()
def feedback(
    name: str,
    out: Annotated[
        Path | None, typer.Option(help="Write JSON lines here (default: stdout).")
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Export the agent's decisions, outcomes and people's corrections as a training set."""
    from edgeos.agents.learning import export_feedback

    with _db(data_dir) as (db, _):
        store.agent(db, name)
        lines = list(export_feedback(db, name))
    if out is None:
        for line in lines:
            typer.echo(line)
        return
    out.write_text("".join(line + "\n" for line in lines))
    console.print(f"{len(lines)} examples written to {out}")


# -- runs ------------------------------------------------------------------------------
@runs_app.command("list")
def list_runs(
    agent: Annotated[str | None, typer.Option(help="Only this agent's runs.")] = None,
    state: Annotated[str | None, typer.Option(help="Only runs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    data_dir: DataDirOption = None,
) -> None:
    """List runs, newest first."""
    with _db(data_dir) as (db, _):
        rows = store.runs(db, agent=agent, state=state, limit=limit)
    table = Table("run", "agent", "trigger", "state", "steps", "cost", "started", "error")
    for r in rows:
        table.add_row(
            r.id, r.agent, r.trigger, r.state, str(r.step_count), f"{r.cost:.4f}",
            _when(r.created_at), (r.error or "")[:60],
        )  # fmt: skip
    console.print(table if rows else "no runs")


@runs_app.command("show")
def show_run(run_id: str, data_dir: DataDirOption = None) -> None:
    """The run's journal, readable."""
    with _db(data_dir) as (db, _):
        run = store.run(db, run_id)
        records = journal.for_run(db, run_id)
        spans = tracing.spans_of_trace(db.reader(), tracing.trace_id(run_id))
    console.print(
        f"run [bold]{run.id}[/] of {run.agent} {run.agent_version}: {run.state} "
        f"(trigger {run.trigger}, cost {run.cost:.4f})"
    )
    for r in records:
        if r.kind == "venue_decided":  # the decision explained, not its raw record
            from edgeos.routing.stats import explain

            first, *rest = explain(r.payload)
            console.print(f"{r.seq:>6} {_when(r.at)} [bold]{r.kind}[/] {r.step or ''} {escape(first)}",
                          highlight=False)  # fmt: skip
            for line in rest:
                console.print(f"{'':>27}{escape(line)}", highlight=False)
            continue
        console.print(
            f"{r.seq:>6} {_when(r.at)} [bold]{r.kind}[/] {r.step or ''} {_summary(r.payload)}",
            highlight=False,
        )
    if spans:
        _print_trace(spans)


def _print_trace(spans: list[tracing.SpanRecord]) -> None:
    """The run's trace as a timeline: each span's start after the first, its duration."""
    origin = min(s.start_ns for s in spans)
    console.print(f"trace [bold]{spans[0].trace_id}[/]")
    for s in spans:
        flag = " [red]error[/]" if s.status == "error" else ""
        console.print(
            f"  +{(s.start_ns - origin) / 1e6:>10.1f} ms {s.duration_ms:>10.1f} ms  "
            f"{'  ' * s.depth}{escape(s.name)}{flag}",
            highlight=False,
        )


def _summary(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, default=str, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


@runs_app.command("cancel")
def cancel_run(
    run_id: str,
    by: Annotated[str, typer.Option(help="Who cancels, for the journal.")] = "cli",
    data_dir: DataDirOption = None,
) -> None:
    """Cancel an unfinished run (effects it already committed are still delivered)."""
    with _db(data_dir) as (db, _):
        done = manage.cancel(db, run_id, by=by)
    if not done:
        console.print(f"run {run_id} had already finished")
        raise typer.Exit(1)
    console.print(f"run {run_id} cancelled")


@runs_app.command("replay")
def replay_run(run_id: str, data_dir: DataDirOption = None) -> None:
    """Run the reasoning again from journaled inputs and report decisions that differ."""
    from edgeos.agents.replay import replay

    with _db(data_dir) as (db, settings):
        report = replay(db, run_id, settings=settings)
    for line in report.lines():
        console.print(line, highlight=False)
    if not report.same:
        raise typer.Exit(2)


runs_app.command("migrate")(runs_migrate_cmd.migrate)
runs_app.command("accept")(runs_migrate_cmd.accept_envelope)
runs_app.command("receive")(runs_migrate_cmd.receive)
runs_app.command("reclaim")(runs_migrate_cmd.reclaim_run)
runs_app.command("verify")(runs_migrate_cmd.verify_run)


# -- journal ---------------------------------------------------------------------------
@journal_app.command("verify")
def verify(data_dir: DataDirOption = None) -> None:
    """Check the hash chain; names the first record that does not hold."""
    with _db(data_dir) as (db, _):
        result = journal.verify(db)
    if result.ok:
        console.print(f"journal intact: {result.checked} records verified")
        return
    console.print(
        f"[bold red]journal broken[/] at record {result.first_bad_seq}: {result.reason} "
        f"({result.checked} records read)"
    )
    raise typer.Exit(1)


# -- approvals -------------------------------------------------------------------------
@approvals_app.command("list")
def list_approvals(data_dir: DataDirOption = None) -> None:
    """Open questions, oldest first."""
    with _db(data_dir) as (db, _):
        rows = store.escalations(db, state="open")
    table = Table("id", "question", "options", "proposal", "default", "deadline")
    for e in rows:
        table.add_row(
            e.id, e.question, ", ".join(map(str, e.options)), str(e.proposal), str(e.default),
            _when(e.deadline),
        )  # fmt: skip
    console.print(table if rows else "nothing waiting for an answer")


@approvals_app.command("answer")
def answer(
    escalation_id: str,
    choice: str,
    note: Annotated[str | None, typer.Option(help="Why, for the journal.")] = None,
    by: Annotated[str, typer.Option(help="Who answers.")] = "cli",
    data_dir: DataDirOption = None,
) -> None:
    """Answer a question; the run continues within a second."""
    with _db(data_dir) as (db, _):
        done = manage.answer(db, escalation_id, choice, by=by, note=note)
    if not done:
        console.print(f"{escalation_id} was already answered")
        raise typer.Exit(1)
    console.print(f"answered {escalation_id}: {choice}")
