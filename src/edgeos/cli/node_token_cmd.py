"""``edgeos node token ...``: named, scoped tokens for the node's HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from edgeos.cli.common import DataDirOption, console, err_console, lifetime, node_settings
from edgeos.node import tokens
from edgeos.state import Database

app = typer.Typer(
    help="Tokens for programs that call the node's API (the node keeps only their hash).",
    no_args_is_help=True,
)


@app.command("create")
def create(
    name: str,
    scope: Annotated[
        list[str],
        typer.Option(
            help="What the token may do (repeatable): read, infer, run, run:AGENT, approve."
        ),
    ],
    expires: Annotated[
        str | None, typer.Option(help="Lifetime, e.g. 90d; refused after it. Default: none.")
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Make a token and print it once (to standard output, alone, for scripts)."""
    ttl = lifetime(expires)
    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        made, secret = tokens.create(db, name, scope, ttl_s=ttl)
    until = "" if made.expires_at is None else f", until {_when(made.expires_at)}"
    err_console.print(
        f"token [bold]{made.name}[/] ({', '.join(made.scopes)}{until}); shown once, "
        "keep it secret:",
        highlight=False,
    )
    typer.echo(secret)


@app.command("list")
def list_tokens(data_dir: DataDirOption = None) -> None:
    """Every named token: scopes, dates, state (never the token)."""
    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        found = tokens.tokens(db)
    table = Table("name", "scopes", "created", "expires", "state")
    for t in found:
        expires = "-" if t.expires_at is None else _when(t.expires_at)
        table.add_row(t.name, " ".join(t.scopes), _when(t.created_at), expires, t.state)
    console.print(table)
    console.print(
        f"and the local token, every scope: {tokens.local_token_path(settings.data_dir)}",
        highlight=False,
    )


@app.command("revoke")
def revoke(name: str, data_dir: DataDirOption = None) -> None:
    """Refuse the token from the node's next request on."""
    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        count = tokens.revoke(db, name)
    said = "revoked" if count else "was already revoked"
    console.print(f"token [bold]{name}[/] {said}", highlight=False)


def _when(at: float) -> str:
    return datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M")
