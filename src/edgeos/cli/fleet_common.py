"""What the ``edgeos fleet`` command modules share: the client, times, JSON output."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from edgeos.fleet.client import FleetClient

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


def client_from_config() -> FleetClient:
    """A client of the fleet this user logged in to (for every operator command)."""
    # Imported here: httpx and the TLS helpers load only for commands that use them.
    from edgeos.fleet.client import client_from_login

    return client_from_login()


def when(moment: float | None) -> str:
    if not moment:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))


def print_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, sort_keys=True))
