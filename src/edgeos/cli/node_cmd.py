"""``edgeos node ...``: run the node and inspect its settings."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from edgeos.cli import node_token_cmd
from edgeos.cli.common import DataDirOption, console, node_settings, node_token, size
from edgeos.settings import NODE_SETTINGS

app = typer.Typer(help="Run and inspect the node on this device.", no_args_is_help=True)
app.add_typer(node_token_cmd.app, name="token")


@app.command()
def run(
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="Listen address (env EDGEOS_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (env EDGEOS_PORT).")] = None,
    fleet: Annotated[
        str | None,
        typer.Option(
            "--fleet",
            help="Fleet control plane to follow, https://HOST:PORT (env EDGEOS_FLEET_URL).",
            show_default=False,
        ),
    ] = None,
    join_token: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEOS_JOIN_TOKEN",
            help="Join token for the first enrollment, or to come back after a revocation "
            "(env EDGEOS_JOIN_TOKEN keeps it off the command line). Never stored.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT.

    With --fleet and --join-token the node enrolls in the fleet, then follows it: it
    syncs, installs what the fleet deploys (rolling back what fails its health check),
    and keeps running its last good state while the fleet is out of reach.
    """
    # Usually not reached: `edgeos.cli.main` runs `node run` with these flags without
    # Typer, to keep it out of the node's memory. A new option here goes through Typer
    # until `main.node_run_flags` reads it too.
    from edgeos.node import run_node

    run_node(node_settings(data_dir, host=host, port=port, fleet_url=fleet), join_token=join_token)


@app.command()
def settings(data_dir: DataDirOption = None) -> None:
    """Show every node setting, its value here and where it can be set."""
    resolved = node_settings(data_dir)
    table = Table("setting", "value", "environment", "meaning")
    for s in NODE_SETTINGS:
        value = getattr(resolved, s.name)
        shown = ", ".join(value) if isinstance(value, tuple) else str(value)
        table.add_row(s.name, shown, s.env, s.help)
    console.print(table)


# -- as a service -----------------------------------------------------------------------
@app.command()
def install(
    user: Annotated[
        str, typer.Option(help="System user the node runs as (made if missing).")
    ] = "edgeos",
    data_dir: Annotated[
        str, typer.Option("--data-dir", help="Data directory of the service (made 0750).")
    ] = "/var/lib/edgeos",
    memory_max_mb: Annotated[
        int | None,
        typer.Option(
            help="MemoryMax= of the service, also the node's memory budget unless node.yaml "
            "sets one (default: node.yaml's memory_budget_mb, else 1024).",
            show_default=False,
        ),
    ] = None,
    fleet: Annotated[
        str | None,
        typer.Option(
            help="Fleet control plane URL. Stored with the join token in the data directory "
            "(0600, never in the unit); the node enrolls with them when it starts.",
            show_default=False,
        ),
    ] = None,
    join_token: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEOS_JOIN_TOKEN",
            help="Token to join the fleet with (env EDGEOS_JOIN_TOKEN keeps it off the "
            "command line).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the unit and the commands; change nothing.")
    ] = False,
) -> None:
    """Install the node as a systemd service (needs root), enable it and start it.

    Makes the system user and the data directory, writes
    /etc/systemd/system/edgeos-node.service (restarted on failure, MemoryMax=, hardened),
    and runs systemctl. If any step fails, the steps already done are undone. Logs go to
    the journal (journalctl -u edgeos-node), which rotates them: no log files are written.
    Where there is no systemd (containers), run `edgeos node run` in the foreground.
    """
    from pathlib import Path

    from edgeos.node import service

    plan = service.build_plan(
        user=user, data_dir=Path(data_dir), memory_max_mb=memory_max_mb, fleet_url=fleet,
        join_token=join_token,
    )  # fmt: skip
    if dry_run:
        report, problems = service.dry_run(plan)
        # Plain and unwrapped, so the unit and the commands can be copied as they are.
        typer.echo(f"# {report.unit_path}\n{report.unit}")
        typer.echo("# steps, in order (each undone if a later one fails):")
        for step in report.steps:
            typer.echo(step)
        if problems:
            console.print("\n# an install here would stop before changing anything:")
            for problem in problems:
                console.print(f"- {problem}", markup=False, highlight=False)
        return
    report = service.install(plan)
    console.print(f"[bold]edgeos-node[/] installed, enabled and started ({report.unit_path})")
    for note in report.notes:
        console.print(f"  {note}", markup=False, highlight=False)


@app.command()
def uninstall(
    keep_data: Annotated[
        bool,
        typer.Option(
            "--keep-data/--remove-data",
            help="Keep the data directory and its user (default), or remove both.",
        ),
    ] = True,
) -> None:
    """Stop, disable and remove the node's systemd service (needs root)."""
    from edgeos.node import service

    report = service.uninstall(keep_data=keep_data)
    console.print("[bold]edgeos-node[/] stopped, disabled and removed")
    if report.data_dir is not None:
        state = "kept" if report.data_kept else "removed, with its user"
        console.print(f"  data directory {report.data_dir}: {state}", highlight=False)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")] = False,
    url: Annotated[
        str | None,
        typer.Option(
            help="The node's API (default: from the node's host and port settings).",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Version, uptime, fleet link, agents, models, memory and disk, buffers, last errors.

    Asks the running node; when it does not answer, reads the data directory's database
    and says the node is not running (exit status 3, as `systemctl status` does).
    """
    from edgeos.cli import status_view

    settings = node_settings(data_dir)
    url = (url or settings.api_url).rstrip("/")
    snapshot = status_view.ask_node(url, node_token(settings), settings.tls_cert_file)
    if snapshot is None:
        status_view.say_not_running(url, settings)
        snapshot = status_view.read_node(settings)
    if as_json:
        typer.echo(snapshot.dumps().decode())
    else:
        status_view.show(snapshot)
    if not snapshot.running:
        raise typer.Exit(3)


@app.command()
def compact(data_dir: DataDirOption = None) -> None:
    """Hand the database's free pages back to the disk, so that its file shrinks.

    Deleted rows (retention, pruning) leave pages SQLite reuses but keeps in the file; the
    resource guard hands them back by itself when the disk gets tight. A file made before
    edgeos kept a map of its pages is rebuilt once, which needs room for two copies of it.
    Safe while the node runs: its writes wait until this is done.
    """
    import shutil

    from edgeos.errors import StateError
    from edgeos.state import Database

    settings = node_settings(data_dir)
    if not settings.database_path.exists():
        raise StateError(f"no node database at {settings.database_path}: nothing to compact")
    with Database(settings.database_path) as db:
        free = shutil.disk_usage(settings.database_path.parent).free
        done = db.compact(free_disk=free)
    if done.skipped:
        console.print(f"not compacted: {done.skipped}", highlight=False)
        raise typer.Exit(1)
    how = " (rebuilt once; from now on it shrinks in place)" if done.rebuilt else ""
    console.print(
        f"database {size(done.bytes_before)} -> {size(done.bytes_after)}{how}", highlight=False
    )
