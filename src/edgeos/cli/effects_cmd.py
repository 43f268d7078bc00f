"""``edgeos effects ...``: effects waiting, dead or set aside for review, and what to do.

Retrying or discarding is journaled with the user who did it; a running node picks a
retried effect up within its poll interval.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeos.cli.common import DataDirOption, console, node_settings
from edgeos.cli.fleet_common import when
from edgeos.state import Database

app = typer.Typer(
    help="Effects in the outbox: pending, dead, needing review.", no_args_is_help=True
)


@contextmanager
def _db(data_dir: Path | None) -> Iterator[Database]:
    with Database(node_settings(data_dir).database_path) as db:
        yield db


def _user() -> str:
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid (a container)
        return "user:unknown"


@app.command("list")
def list_effects(
    state: Annotated[
        str | None,
        typer.Option(
            help="pending, needs-review, dead (needs-review included), discarded or "
            "delivered; default: all but delivered."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    data_dir: DataDirOption = None,
) -> None:
    """Effects by state, newest first."""
    from edgeos.connectors.effects import list_effects as listing

    with _db(data_dir) as db:
        found = listing(db, state, limit=limit)
    table = Table("id", "state", "run", "connector.operation", "attempts", "created", "last error")
    for e in found:
        x = e.entry
        table.add_row(x.key, e.state, x.run_id, f"{x.connector}.{x.operation}", str(x.attempts),
                      when(x.created_at), (x.last_error or "")[:120])  # fmt: skip
    console.print(table if found else "no effects", highlight=False)


@app.command("show")
def show(effect_id: str, data_dir: DataDirOption = None) -> None:
    """One effect: state, errors, the payload as journaled, and its journal records."""
    from edgeos.connectors.effects import get_effect, history

    with _db(data_dir) as db:
        effect = get_effect(db, effect_id)
        payload, records = history(db, effect)
    x = effect.entry
    lines = [
        f"effect     {x.key}", f"state      {effect.state}", f"run        {x.run_id}",
        f"target     {x.connector}.{x.operation}", f"attempts   {x.attempts}",
        f"created    {when(x.created_at)}", f"next try   {when(x.next_attempt_at)}",
        f"last error {x.last_error or '-'}",
        "payload    " + ("(its journal record is gone with retention)" if payload is None
                         else json.dumps(payload, sort_keys=True)),
        "journal",
    ]  # fmt: skip
    lines += [f"  {when(r.at)}  {r.kind}  {json.dumps(_shown(r.payload), sort_keys=True)}"
              for r in records]  # fmt: skip
    console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


def _shown(payload: dict[str, object]) -> dict[str, object]:
    # The journaled payload is printed once above; the records say what happened.
    return {k: v for k, v in payload.items() if k not in ("payload", "key")}


@app.command("retry")
def retry(effect_id: str, data_dir: DataDirOption = None) -> None:
    """Send a dead or needs-review effect again now (same idempotency key)."""
    from edgeos.connectors.effects import retry_effect

    with _db(data_dir) as db:
        effect = retry_effect(db, effect_id, by=_user())
    console.print(f"effect {effect.key} is pending again; the node delivers it shortly",
                  highlight=False, markup=False)  # fmt: skip


@app.command("discard")
def discard(
    effect_id: str,
    reason: Annotated[str, typer.Option(help="Why (kept in the journal).")],
    data_dir: DataDirOption = None,
) -> None:
    """Set an effect aside for good; it is never delivered."""
    from edgeos.connectors.effects import discard_effect

    with _db(data_dir) as db:
        effect = discard_effect(db, effect_id, reason=reason, by=_user())
    console.print(f"effect {effect.key} discarded", highlight=False, markup=False)
