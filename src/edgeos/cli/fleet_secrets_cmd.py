"""``edgeos fleet secrets ...``: grant secrets to devices, list and revoke grants.

A value is read from a hidden prompt, standard input or ``--from-file``; never from the
command line, where shell history and ``ps`` would show it. Nothing prints a value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeos.cli.common import console
from edgeos.cli.fleet_common import JsonOption, client_from_config, print_json, when
from edgeos.cli.secrets_cmd import read_value
from edgeos.errors import ConfigError

secrets_app = typer.Typer(
    help="Secrets granted to devices, sealed to each device's key (deploy).",
    no_args_is_help=True,
)


@secrets_app.command("grant")
def grant(
    name: Annotated[str, typer.Argument(help="The secret's name, as connectors name it.")],
    scope: Annotated[
        list[str],
        typer.Option(
            help="Scope allowed to read it on the device (repeatable): a binding's "
            "name or a scope bindings list in connectors.yaml."
        ),
    ],
    expires: Annotated[str, typer.Option(help="Lifetime, e.g. 7d; refused on devices after it.")],
    device: Annotated[str | None, typer.Option(help="Grant to this device.")] = None,
    group: Annotated[str | None, typer.Option(help="Grant to every device of this group.")] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(help="Read the value from this file (one trailing newline is dropped)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Grant a secret to a device or a group (the value from a prompt, stdin or --from-file)."""
    from edgeos.manifests.durations import parse_duration

    if (device is None) == (group is None):
        raise ConfigError("give --device ID or --group G (one of them)")
    try:
        expires_s = parse_duration(expires)
    except ValueError as exc:
        raise ConfigError(f"--expires: {exc}") from exc
    if from_file is not None:
        try:
            value = from_file.read_text(encoding="utf-8").removesuffix("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--from-file {from_file}: {exc}") from exc
    else:
        value = read_value(name)
    with client_from_config() as client:
        made = client.grant_secret(
            name, value, scopes=scope, expires_s=expires_s, device=device, group=group
        )
    if as_json:
        print_json(made)
        return
    target = f"device {made['device_id']}" if made["device_id"] else f"group {made['group']}"
    console.print(
        f"granted {made['name']} (version {made['version']}) to {target} as {made['id']}, "
        f"for {', '.join(made['scopes'])}, until {when(made['expires_at'])}",
        highlight=False, markup=False,
    )  # fmt: skip


@secrets_app.command("list")
def list_grants(
    name: Annotated[str | None, typer.Option(help="Only grants of this secret.")] = None,
    device: Annotated[str | None, typer.Option(help="Only grants to this device.")] = None,
    group: Annotated[str | None, typer.Option(help="Only grants to this group.")] = None,
    active: Annotated[bool, typer.Option(help="Only grants in force.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Grants, newest first: names, targets, scopes, expiry, state; never values."""
    filters = {"name": name, "device": device, "group": group, "active": "true" if active else None}
    with client_from_config() as client:
        found = client.secret_grants(**{k: v for k, v in filters.items() if v})
    if as_json:
        print_json(found)
        return
    table = Table("id", "name", "version", "to", "scopes", "expires", "state", "by")
    for g in found:
        to = f"device {g['device_id']}" if g["device_id"] else f"group {g['group']}"
        table.add_row(g["id"], g["name"], str(g["version"]), to, ", ".join(g["scopes"]),
                      when(g["expires_at"]), g["state"], g["created_by"])  # fmt: skip
    console.print(table if found else "no secret grants")


@secrets_app.command("revoke")
def revoke(grant_id: Annotated[str, typer.Argument(help="The grant's id.")]) -> None:
    """Revoke a grant: its value is erased, and devices delete the secret at their next sync."""
    with client_from_config() as client:
        done = client.revoke_secret_grant(grant_id)
    console.print(f"grant {done['id']} ({done['name']}) revoked", highlight=False, markup=False)
