"""``edgeos fleet alerts ...``: rules on KPIs and devices, delivered to webhooks.

The commands drive the fleet's operator API (``/api/v1/alerts``) with the stored login;
the fleet validates and audits every change, so these only shape arguments and show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from edgeos.cli.common import console
from edgeos.cli.fleet_common import JsonOption, client_from_config, print_json, when
from edgeos.errors import ConfigError

alerts_app = typer.Typer(
    help="Alert rules (p99 latency, success rate, drift, devices offline) sent to webhooks.",
    no_args_is_help=True,
)


@alerts_app.command("create")
def alerts_create(
    name: Annotated[str, typer.Argument(help="A name for the rule.")],
    when_: Annotated[
        str,
        typer.Option("--when", help="p99_ms>250, success_rate<0.95, drift>0.3 or offline>10m."),
    ],
    webhook: Annotated[str, typer.Option(help="The http(s) URL notifications are POSTed to.")],
    target: Annotated[
        str, typer.Option(help="Devices: all, group=G, label:K=V or device=ID.")
    ] = "all",
    per: Annotated[
        str, typer.Option(help="device, or agent or model: fleet-wide over the target.")
    ] = "device",
    window: Annotated[
        float, typer.Option(help="Seconds of the recent past a KPI rule judges.")
    ] = 300.0,
    secret_file: Annotated[
        Path | None,
        typer.Option(help="A file holding a secret (16+ characters) that signs notifications."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Add a rule (deploy scope): it fires once per device or subject, then resolves."""
    secret = None
    if secret_file is not None:
        try:
            secret = secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--secret-file {secret_file}: {exc.strerror}") from None
    with client_from_config() as client:
        rule = client.create_alert_rule(
            name=name, condition=when_, webhook=webhook, target=target, per=per,
            window_s=window, secret=secret,
        )  # fmt: skip
    if as_json:
        print_json(rule)
        return
    console.print(
        f"alert rule {rule['id']} {rule['name']!r}: {rule['condition']} per {rule['per']} "
        f"on {rule['target']} -> {rule['webhook']}",
        markup=False, highlight=False,
    )  # fmt: skip


@alerts_app.command("list")
def alerts_list(as_json: JsonOption = False) -> None:
    """Every alert rule."""
    with client_from_config() as client:
        rules = client.alert_rules()
    if as_json:
        print_json(rules)
        return
    table = Table("id", "name", "condition", "per", "target", "webhook", "signed", "by")
    for r in rules:
        table.add_row(r["id"], Text(r["name"]), r["condition"], r["per"], Text(r["target"]),
                      Text(r["webhook"]), "yes" if r["signed"] else "no",
                      Text(r["created_by"]))  # fmt: skip
    console.print(table)


@alerts_app.command("delete")
def alerts_delete(
    rule_id: Annotated[str, typer.Argument(help="The rule's id (al-...).")],
) -> None:
    """Remove a rule (deploy scope); its unsent notifications go with it."""
    with client_from_config() as client:
        rule = client.delete_alert_rule(rule_id)
    console.print(f"deleted alert rule {rule['id']} {rule['name']!r}", markup=False)


@alerts_app.command("firing")
def alerts_firing(as_json: JsonOption = False) -> None:
    """What fires now: rule, subject, value, since when."""
    with client_from_config() as client:
        found = client.alerts()
    if as_json:
        print_json(found)
        return
    table = Table("rule", "subject", "value", "since")
    for a in found:
        table.add_row(Text(a["rule"]), Text(a["subject"]), f"{a['value']:g}", when(a["since"]))
    console.print(table)
    console.print(f"{len(found)} firing", highlight=False)


@alerts_app.command("notifications")
def alerts_notifications(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """The newest notifications and how their delivery went."""
    with client_from_config() as client:
        found = client.alert_notifications(limit)
    if as_json:
        print_json(found)
        return
    table = Table("id", "rule", "subject", "status", "delivery", "attempts", "at", "error")
    for n in found:
        table.add_row(str(n["id"]), n["rule_id"], Text(n["subject"]), n["status"], n["state"],
                      str(n["attempts"]), when(n["created_at"]),
                      Text((n["error"] or "")[:80]))  # fmt: skip
    console.print(table)
