"""``edgeos fleet approvals ...``: escalations devices reported, and answering them."""

from __future__ import annotations

from typing import Annotated

import orjson
import typer
from rich.table import Table
from rich.text import Text

from edgeos.cli.common import console
from edgeos.cli.fleet_common import JsonOption, client_from_config, print_json, when

approvals_app = typer.Typer(
    help="Escalations agents raised on devices, answered from the fleet.", no_args_is_help=True
)


def _choice(text: str) -> object:
    # An option may be a number or a boolean: JSON when it parses, else the text itself
    # (the fleet also matches an option by its text).
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


@approvals_app.command("list")
def approvals_list(
    state: Annotated[
        str | None, typer.Option(help="open, answered, applied, refused or closed.")
    ] = "open",
    device: Annotated[str | None, typer.Option(help="Only this device.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List escalations (open ones unless --state says otherwise)."""
    with client_from_config() as client:
        found = client.approvals(state=state or None, device=device)
    if as_json:
        print_json(found)
        return
    table = Table("device", "escalation", "agent", "question", "options", "proposal", "state",
                  "deadline")  # fmt: skip
    for e in found:
        table.add_row(e["device_id"], e["id"], e["agent"], Text(e["question"]),
                      Text(", ".join(map(str, e["options"]))), Text(str(e["proposal"])),
                      e["state"], when(e["deadline"]))  # fmt: skip
    console.print(table)
    console.print(f"{len(found)} escalation(s)", highlight=False)


@approvals_app.command("answer")
def approvals_answer(
    device_id: Annotated[str, typer.Argument(help="The device that raised it.")],
    escalation_id: Annotated[str, typer.Argument(help="The escalation's id.")],
    choice: Annotated[str, typer.Argument(help="One of its options.")],
    note: Annotated[str | None, typer.Option(help="Why, for the journal.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Answer an open escalation (deploy scope); the device applies it on its next sync."""
    with client_from_config() as client:
        row = client.answer_approval(device_id, escalation_id, _choice(choice), note)
    if as_json:
        print_json(row)
        return
    console.print(
        f"answered {escalation_id} of {device_id}: {row['answer']!r} (sent on its next sync)",
        markup=False, highlight=False,
    )  # fmt: skip
