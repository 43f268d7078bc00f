"""``edgeos node token ...``: named, scoped tokens for the node's HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from edgeos.cli.common import DataDirOption, console, err_console, lifetime, node_settings
from edgeos.node import spending, tokens
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
            help="What the token may do (repeatable): read, infer, infer:MODEL, run, "
            "run:AGENT, approve, approve:AGENT."
        ),
    ],
    expires: Annotated[
        str | None, typer.Option(help="Lifetime, e.g. 90d; refused after it. Default: none.")
    ] = None,
    cost_per_day: Annotated[
        float | None,
        typer.Option(
            help="What the chat calls the node relays for it to paid venues may cost in a "
            "sliding day (in the venues' currency). Default: no limit.",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Make a token and print it once (to standard output, alone, for scripts)."""
    ttl = lifetime(expires)
    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        made, secret = tokens.create(db, name, scope, ttl_s=ttl, cost_per_day=cost_per_day)
    until = "" if made.expires_at is None else f", until {_when(made.expires_at)}"
    budget = "" if made.cost_per_day is None else f", {made.cost_per_day:g} a day"
    err_console.print(
        f"token [bold]{made.name}[/] ({', '.join(made.scopes)}{until}{budget}); shown once, "
        "keep it secret:",
        highlight=False,
    )
    typer.echo(secret)


@app.command("list")
def list_tokens(data_dir: DataDirOption = None) -> None:
    """Every named token: scopes, dates, state (never the token)."""
    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        found = [(t, spending.spent(db, t.digest)) for t in tokens.tokens(db)]
    table = Table(
        "name", "scopes", "created", "expires", "last used", "spent today / a day", "state"
    )
    for t, spent in found:
        expires = "-" if t.expires_at is None else _when(t.expires_at)
        used = "never" if t.last_used_at is None else _when(t.last_used_at)
        budget = "no limit" if t.cost_per_day is None else f"{t.cost_per_day:g}"
        table.add_row(
            t.name, " ".join(t.scopes), _when(t.created_at), expires, used,
            f"{spent:.4g} / {budget}", t.state,
        )  # fmt: skip
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


@app.command("rotate-local")
def rotate_local(data_dir: DataDirOption = None) -> None:
    """Replace the local token (DATA_DIR/api-token); the old one is refused from the
    running node's next request on. Run it as the node's user or as root."""
    settings = node_settings(data_dir)
    tokens.rotate_local_token(settings.data_dir)
    console.print(
        f"new local token in {tokens.local_token_path(settings.data_dir)}; the old one is "
        "refused from now on (programs that read the file get the new one)",
        highlight=False,
    )
