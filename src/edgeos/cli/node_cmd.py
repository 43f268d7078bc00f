"""``edgeos node ...``: run the node and inspect its settings."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from edgeos.cli.common import DataDirOption, console, node_settings
from edgeos.settings import NODE_SETTINGS

app = typer.Typer(help="Run and inspect the node on this device.", no_args_is_help=True)


@app.command()
def run(
    data_dir: DataDirOption = None,
    host: Annotated[str | None, typer.Option(help="Listen address (env EDGEOS_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (env EDGEOS_PORT).")] = None,
) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT."""
    from edgeos.node import run_node

    run_node(node_settings(data_dir, host=host, port=port))


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
