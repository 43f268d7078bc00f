"""``edgeos fleet devices ...``: list, show, label and revoke enrolled devices."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from edgeos.cli.common import console
from edgeos.cli.fleet_common import JsonOption, client_from_config, print_json, when
from edgeos.errors import ConfigError

devices_app = typer.Typer(help="Enrolled devices.", no_args_is_help=True)


@devices_app.command("list")
def devices_list(
    group: Annotated[str | None, typer.Option(help="Only this group.")] = None,
    label: Annotated[list[str] | None, typer.Option(help="Only devices with label K=V.")] = None,
    status: Annotated[str | None, typer.Option(help="active or revoked.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 1000,
    as_json: JsonOption = False,
) -> None:
    """List devices."""
    with client_from_config() as client:
        found = client.devices(group=group, labels=label or [], status=status, limit=limit)
    if as_json:
        print_json(found)
        return
    table = Table("id", "group", "status", "labels", "health", "last seen")
    for d in found:
        labels = ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))
        table.add_row(d["id"], d["group"], d["status"], Text(labels), d["health"].get("status", "-"),
                      when(d["last_seen"]))  # fmt: skip
    console.print(table)
    console.print(f"{len(found)} device(s)", highlight=False)


@devices_app.command("show")
def devices_show(
    device_id: Annotated[str, typer.Argument(help="The device's id.")], as_json: JsonOption = False
) -> None:
    """One device: group, labels, inventory, health, what it runs and should run."""
    with client_from_config() as client:
        d = client.device(device_id)
    if as_json:
        print_json(d)
        return
    console.print(f"[bold]{d['id']}[/] group {d['group']}, {d['status']}", highlight=False)
    console.print(f"  enrolled {when(d['enrolled_at'])}, last seen {when(d['last_seen'])}")
    labels = ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "-"
    console.print(f"  labels: {labels}", markup=False, highlight=False)
    inv = d["inventory"]
    if inv:
        console.print(
            f"  {inv.get('hostname')}: edgeos {inv.get('edgeos_version')}, {inv.get('machine')}, "
            f"{inv.get('cpu_count')} CPU, {inv.get('memory_mb')} MB, "
            f"providers {', '.join(inv.get('execution_providers') or []) or '-'}",
            markup=False, highlight=False,
        )  # fmt: skip
    health = d["health"]
    if health:
        console.print(
            f"  health {health.get('status')}: {health.get('runs', 0)} runs, "
            f"{health.get('runs_failed', 0)} failed, p99 {health.get('inference_p99_ms')} ms",
            markup=False, highlight=False,
        )  # fmt: skip
    table = Table("kind", "name", "desired", "previous", "actual", "rollout")
    actual = {(a["kind"], a["name"]): a for a in d["actual"]}
    for a in d["assignments"]:
        running = actual.get((a["kind"], a["name"]))
        shown = "-" if running is None else f"{running['version']} ({running['state']})"
        table.add_row(a["kind"], a["name"], a["version"], a["previous_version"] or "-", shown,
                      a["rollout_id"] or "-")  # fmt: skip
    console.print(table)


@devices_app.command("label")
def devices_label(
    device_id: Annotated[str, typer.Argument(help="The device's id.")],
    labels: Annotated[list[str] | None, typer.Argument(help="K=V labels to set.")] = None,
    remove: Annotated[list[str] | None, typer.Option(help="A label key to remove.")] = None,
) -> None:
    """Set or remove labels of a device."""
    from edgeos.fleet.devices import parse_label_terms

    wanted = parse_label_terms(labels or [])
    if not wanted and not remove:
        raise ConfigError("give K=V labels to set, or --remove K")
    with client_from_config() as client:
        current = client.device(device_id)["labels"]
        current.update(wanted)
        for key in remove or []:
            current.pop(key, None)
        result = client.set_labels(device_id, current)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(result.items())) or "(none)"
    console.print(f"{device_id} labels: {shown}", markup=False, highlight=False)


@devices_app.command("revoke")
def devices_revoke(device_id: Annotated[str, typer.Argument(help="The device's id.")]) -> None:
    """Revoke a device: refused from its next request; only a new join token brings it back."""
    with client_from_config() as client:
        client.revoke_device(device_id)
    console.print(f"device {device_id} revoked", highlight=False)
