"""``edgeos secrets ...``: the node's credential vault (values are never printed)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeos.cli.common import DataDirOption, console, lifetime, node_settings
from edgeos.connectors.vault import Vault, load_key
from edgeos.state import Database

app = typer.Typer(help="Secrets for connectors, encrypted on this device.", no_args_is_help=True)


@contextmanager
def _vault(data_dir: Path | None) -> Iterator[Vault]:
    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        yield Vault(db, load_key(settings.data_dir))


def read_value(name: str) -> str:
    """From a hidden prompt, or from standard input when it is not a terminal (for scripts):
    never from the command line, where shell history and ``ps`` would show it."""
    if sys.stdin.isatty():
        value: str = typer.prompt(f"value of {name}", hide_input=True, confirmation_prompt=True)
        return value
    return sys.stdin.read().rstrip("\n")


@app.command("set")
def set_secret(
    name: str,
    scope: Annotated[
        list[str],
        typer.Option(
            help="Scope allowed to read it (repeatable): a binding's name, or a scope that "
            "bindings list under scopes in connectors.yaml, like supplier.write."
        ),
    ],
    expires: Annotated[
        str | None, typer.Option(help="Lifetime, e.g. 30d; the secret is refused after it.")
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Store a secret (the value is read from a prompt or standard input)."""
    ttl = lifetime(expires)
    expires_at = None if ttl is None else time.time() + ttl
    value = read_value(name)
    with _vault(data_dir) as vault:
        info = vault.set(name, value, scopes=scope, expires_at=expires_at)
    console.print(
        f"secret {info.name} stored (version {info.version}) for {', '.join(info.scopes)}"
    )


@app.command("rotate")
def rotate(name: str, data_dir: DataDirOption = None) -> None:
    """Replace a secret's value, keeping its scopes and expiry."""
    with _vault(data_dir) as vault:
        vault.info(name)
        info = vault.rotate(name, read_value(name))
    console.print(f"secret {info.name} rotated to version {info.version}")


@app.command("list")
def list_secrets(data_dir: DataDirOption = None) -> None:
    """Names, scopes, versions, expiry and where each came from; never values."""
    with _vault(data_dir) as vault:
        rows = vault.entries()
    table = Table("name", "version", "scopes", "expires", "updated", "from")
    for s in rows:
        expiry = (
            datetime.fromtimestamp(s.expires_at).isoformat(" ", "minutes") if s.expires_at else ""
        )
        table.add_row(
            s.name, str(s.version), ", ".join(s.scopes), expiry,
            datetime.fromtimestamp(s.updated_at).isoformat(" ", "minutes"),
            f"fleet grant {s.grant_id}" if s.grant_id else "this node",
        )  # fmt: skip
    console.print(table if rows else "no secrets")


@app.command("remove")
def remove(name: str, data_dir: DataDirOption = None) -> None:
    """Forget a secret."""
    with _vault(data_dir) as vault:
        vault.remove(name)
    console.print(f"secret {name} removed")
