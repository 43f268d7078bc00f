"""The ``edgeos`` command line. Every error edgeos raises becomes one line and exit code 1.

``edgeos node run`` with plain flags skips Typer: the node is a long-lived process, and
Typer with Rich and pydantic (which Typer coerces parameters with) would stay resident
in it for nothing, about 13 MB of an idle node's 50 MB budget. Anything else, a
``--help``, an unusual spelling or a value Typer should judge, goes through Typer as
always, so the command behaves the same either way; ``tests/test_footprint.py`` watches
both. The Typer app itself is built on first use, for the same reason.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeos.errors import EdgeOSError

if TYPE_CHECKING:
    import typer

# The options of ``edgeos node run`` (see ``node_cmd.run``) that the lean path reads.
_NODE_RUN_OPTIONS = {
    "--data-dir": "data_dir",
    "--host": "host",
    "--port": "port",
    "--fleet": "fleet_url",
    "--join-token": "join_token",
}


def build_app() -> typer.Typer:
    """The Typer application with every command."""
    import typer

    from edgeos import __version__
    from edgeos.cli import (
        agent_cmd,
        demo_cmd,
        effects_cmd,
        fleet_cmd,
        memory_cmd,
        model_cmd,
        node_cmd,
        routing_cmd,
        secrets_cmd,
    )

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
    app.add_typer(effects_cmd.app, name="effects")
    app.add_typer(memory_cmd.app, name="memory")
    app.add_typer(routing_cmd.app, name="routing")
    app.add_typer(fleet_cmd.fleet_app, name="fleet")
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

    return app


def __getattr__(name: str) -> Any:
    # ``from edgeos.cli.main import app`` (tests, embedders) builds the app once.
    if name == "app":
        app = globals()["app"] = build_app()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def node_run_flags(args: list[str]) -> dict[str, object] | None:
    """The flags of ``node run ...`` when they are plain enough to read without Typer.

    Only ``--data-dir D``, ``--host H``, ``--port N``, ``--fleet URL`` and
    ``--join-token T`` (also as ``--opt=value``), each at most once, with a non-empty path
    and a port in canonical decimal. ``fleet_url`` and ``join_token`` are in the result only
    when given. None for anything else, which then goes through Typer.
    """
    if args[:2] != ["node", "run"]:
        return None
    flags: dict[str, object] = {"data_dir": None, "host": None, "port": None}
    rest = args[2:]
    seen = set()
    while rest:
        option, eq, value = rest[0].partition("=")
        if eq:
            rest = rest[1:]
        elif len(rest) >= 2 and not rest[1].startswith("-"):
            value, rest = rest[1], rest[2:]
        else:
            return None
        name = _NODE_RUN_OPTIONS.get(option)
        if name is None or name in seen or not value:
            return None
        seen.add(name)
        if name == "port":
            if not (value.isascii() and value.isdigit()) or str(int(value)) != value:
                return None
            flags[name] = int(value)
        else:
            flags[name] = Path(value) if name == "data_dir" else value
    return flags


def main() -> None:
    """Entry point of the ``edgeos`` console script."""
    try:
        flags = node_run_flags(sys.argv[1:])
        if flags is None:
            build_app()()
        else:
            import os

            from edgeos.node import run_node
            from edgeos.settings import load_settings

            # What ``node_cmd.run`` does, without Typer: see the module's docstring. The
            # join token is not a setting (a secret, used once): it goes to the node alone.
            token = flags.pop("join_token", None) or os.environ.get("EDGEOS_JOIN_TOKEN")
            # httpx imports its own command line, and with it Rich, Pygments and Click,
            # whenever they are installed (as they are for this one): a node never runs
            # it, and they would hold ~4 MB of a node with an HTTP connector.
            sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
            # uvicorn imports watchfiles for its --reload, which a node never uses (~2 MB).
            sys.modules.setdefault("watchfiles", None)  # type: ignore[arg-type]
            run_node(load_settings(flags), join_token=str(token) if token else None)
    except EdgeOSError as exc:
        from edgeos.cli.common import err_console

        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
