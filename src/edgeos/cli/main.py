"""The ``edgeos`` command line. Every error edgeos raises becomes one line and exit code 1."""

from __future__ import annotations

import sys

import typer

from edgeos import __version__
from edgeos.cli import agent_cmd, demo_cmd, model_cmd, node_cmd, secrets_cmd
from edgeos.cli.common import err_console
from edgeos.errors import EdgeOSError

app = typer.Typer(
    name="edgeos",
    help="edgeos: durable AI agents and local models on edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(node_cmd.app, name="node")
app.add_typer(model_cmd.app, name="model")
app.add_typer(agent_cmd.agent_app, name="agent")
app.add_typer(agent_cmd.runs_app, name="runs")
app.add_typer(agent_cmd.journal_app, name="journal")
app.add_typer(agent_cmd.approvals_app, name="approvals")
app.add_typer(secrets_cmd.app, name="secrets")
app.command("demo")(demo_cmd.demo)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgeos {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """edgeos: durable AI agents and local models on edge devices."""


def main() -> None:
    """Entry point of the ``edgeos`` console script."""
    try:
        app()
    except EdgeOSError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
