"""``edgeos fleet ...``: serve the control plane and drive it over its HTTP API.

Every command but ``serve`` and ``init`` talks to a fleet through the operator API with
the login stored by ``edgeos fleet login`` (or EDGEOS_FLEET_URL and EDGEOS_FLEET_TOKEN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from edgeos.cli.common import console
from edgeos.cli.fleet_alerts_cmd import alerts_app
from edgeos.cli.fleet_approvals_cmd import approvals_app
from edgeos.cli.fleet_common import JsonOption, client_from_config, print_json, when
from edgeos.cli.fleet_devices_cmd import devices_app
from edgeos.cli.fleet_rollout_cmd import rollout_app
from edgeos.cli.fleet_secrets_cmd import secrets_app
from edgeos.cli.fleet_simulate_cmd import simulate
from edgeos.errors import ConfigError

__all__ = ["client_from_config", "fleet_app"]

fleet_app = typer.Typer(
    help="The fleet control plane: enrollment, devices, signed artifacts, rollouts.",
    no_args_is_help=True,
)
token_app = typer.Typer(help="Operator tokens (admin).", no_args_is_help=True)
join_app = typer.Typer(help="Join tokens that enroll devices (admin).", no_args_is_help=True)
fleet_app.add_typer(token_app, name="token")
fleet_app.add_typer(join_app, name="join-token")
fleet_app.add_typer(devices_app, name="devices")
fleet_app.add_typer(rollout_app, name="rollout")
fleet_app.add_typer(secrets_app, name="secrets")
fleet_app.add_typer(approvals_app, name="approvals")
fleet_app.add_typer(alerts_app, name="alerts")
fleet_app.command()(simulate)

DataOption = Annotated[
    Path,
    typer.Option(
        "--data", envvar="EDGEOS_FLEET_DATA", help="Fleet data directory (keys, database)."
    ),
]
DbOption = Annotated[
    str | None,
    typer.Option(
        "--db", envvar="EDGEOS_FLEET_DB", help="Database URL (default: SQLite DATA/fleet.db).",
        show_default=False,
    ),
]  # fmt: skip


def _config(data: Path, db: str | None, **values: Any) -> Any:
    from edgeos.fleet.settings import FleetConfig

    return FleetConfig(
        data_dir=data, db_url=db, **{k: v for k, v in values.items() if v is not None}
    )


def _seconds(option: str, text: str) -> float:
    from edgeos.manifests.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from exc


def _replicas(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError as exc:
        raise ConfigError(f"--cloud-replicas {text!r}: give N or MIN-MAX, e.g. 2 or 1-4") from exc


def _announce(report: Any, data: Path) -> None:
    for item in report.created:
        console.print(f"created {item}", markup=False, highlight=False)
    if report.admin_token:
        console.print(
            f"admin token (shown once; also in {data / 'admin-token'}, mode 0600):",
            highlight=False,
        )
        typer.echo(report.admin_token)


@fleet_app.command()
def serve(
    data: DataOption = Path("fleet-data"),
    db: DbOption = None,
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port.")] = 8480,
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="Another name or address for the server certificate."),
    ] = None,
    cert_validity: Annotated[
        str, typer.Option(help="Lifetime of device certificates (renewed at a third left).")
    ] = "24h",
    sync_interval: Annotated[str, typer.Option(help="How often devices sync.")] = "30s",
    cloud_ray: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEOS_FLEET_CLOUD_RAY",
            show_default=False,
            help="Run the cloud venue's models on the Ray cluster at this address "
            "(HOST:PORT, ray://HOST:PORT, auto; local starts one); needs the ray extra.",
        ),
    ] = None,
    cloud_replicas: Annotated[
        str,
        typer.Option(
            envvar="EDGEOS_FLEET_CLOUD_REPLICAS",
            help="Replicas of the cloud venue on Ray: N, or MIN-MAX to scale with the load.",
        ),
    ] = "1-4",
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the fleet over HTTPS; a fresh data directory is initialized first."""
    from edgeos.fleet.keystore import init_fleet
    from edgeos.fleet.serve import run_fleet

    config = _config(
        data, db, host=host, port=port, sans=tuple(san or ()),
        cert_validity_s=_seconds("--cert-validity", cert_validity),
        sync_interval_s=_seconds("--sync-interval", sync_interval),
        cloud_ray=cloud_ray, cloud_replicas=_replicas(cloud_replicas),
    )  # fmt: skip
    _announce(init_fleet(config), data)
    console.print(f"fleet serving on https://{host}:{port}", highlight=False)
    console.print(f"dashboard: https://{host}:{port}/ui/ (sign in with an operator token)",
                  highlight=False)  # fmt: skip
    run_fleet(config, log_level=log_level)


@fleet_app.command()
def init(
    data: DataOption = Path("fleet-data"),
    db: DbOption = None,
    root_keys: Annotated[int, typer.Option(help="Offline TUF root keys to make.")] = 1,
    threshold: Annotated[int, typer.Option(help="Root keys needed to sign a root.")] = 1,
    host: Annotated[str, typer.Option(help="Address the server will listen on.")] = "127.0.0.1",
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="Another name or address for the server certificate."),
    ] = None,
) -> None:
    """Create the CA, the TUF keys and repository, the database and the first admin token."""
    from edgeos.fleet.keystore import init_fleet

    config = _config(data, db, host=host, sans=tuple(san or ()))
    report = init_fleet(config, root_keys=root_keys, threshold=threshold)
    if not report.created:
        console.print(f"{data} is initialized already: nothing to do", highlight=False)
    _announce(report, data)
    if any(item.startswith("TUF keys") for item in report.created):
        console.print(
            f"move the root keys in {config.root_keys_dir} off this machine", highlight=False
        )


@fleet_app.command()
def login(
    url: Annotated[str, typer.Argument(help="The fleet, e.g. https://fleet.example:8480.")],
    token: Annotated[
        str, typer.Option(envvar="EDGEOS_FLEET_TOKEN", help="Operator token (SECRET.CAPIN).")
    ],
) -> None:
    """Pin the fleet's CA from the token, check the token, and store the login (0600)."""
    from edgeos.fleet.client import FleetClient, save_login

    with FleetClient.login(url, token) as client:
        me = client.whoami()
        path = save_login(url, token, client.ca_pem)
    scopes = ", ".join(me["scopes"])
    console.print(
        f"logged in to {url} as {me['name']} ({scopes}); saved in {path}", highlight=False
    )


# -- tokens -----------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who or what the token is for.")],
    scope: Annotated[
        str, typer.Option(help="read, deploy or admin (each implies the ones before).")
    ],
) -> None:
    """Create an operator token; it is shown once."""
    with client_from_config() as client:
        made = client.create_token(name, [scope])
    console.print(f"token {made['id']} ({', '.join(made['scopes'])}), shown once:", highlight=False)
    typer.echo(made["token"])


@token_app.command("list")
def token_list(as_json: JsonOption = False) -> None:
    """List operator tokens (never their secrets)."""
    with client_from_config() as client:
        tokens = client.tokens()
    if as_json:
        print_json(tokens)
        return
    table = Table("id", "name", "scopes", "created", "by", "revoked")
    for t in tokens:
        table.add_row(t["id"], Text(t["name"]), ",".join(t["scopes"]), when(t["created_at"]),
                      Text(t["created_by"]), when(t["revoked_at"]))  # fmt: skip
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(help="The token's id.")]) -> None:
    """Revoke an operator token: refused from its next request on."""
    with client_from_config() as client:
        client.revoke_token(token_id)
    console.print(f"token {token_id} revoked", highlight=False)


@join_app.command("create")
def join_create(
    group: Annotated[
        str | None,
        typer.Option(help="The group devices join (with --replaces: the replaced device's)."),
    ] = None,
    ttl: Annotated[str, typer.Option(help="Lifetime: 30m, 1h, 7d ...")] = "1h",
    uses: Annotated[int, typer.Option(help="Devices it may enroll (bulk provisioning).")] = 1,
    replaces: Annotated[
        str | None,
        typer.Option(help="Enroll one device as this device's replacement: the device is "
                     "revoked and its memory restored onto the new one."),
    ] = None,
) -> None:  # fmt: skip
    """Create a join token for a group, or for the replacement of a device; shown once."""
    ttl_s = _seconds("--ttl", ttl)
    if replaces is None and group is None:
        raise ConfigError("give --group (or --replaces DEVICE to replace a device)")
    if replaces is not None and uses != 1:
        raise ConfigError("a token with --replaces enrolls one device: leave --uses out")
    with client_from_config() as client:
        made = client.create_join_token(group, ttl_s=ttl_s, uses=uses, replaces=replaces)
    console.print(
        f"join token {made['id']} for group {made['group']}, {made['uses']} use(s)"
        + (f", replaces device {replaces}" if replaces else "")
        + f", expires {when(made['expires_at'])}; shown once:",
        highlight=False,
    )
    typer.echo(made["token"])


# -- artifacts and audit ----------------------------------------------------------------


@fleet_app.command()
def publish(
    kind: Annotated[str, typer.Argument(help="agent, model or policy.")],
    path: Annotated[Path, typer.Argument(help="Agent or model directory, or policy YAML file.")],
    name: Annotated[str | None, typer.Option(help="Name (default: the manifest's).")] = None,
    version: Annotated[str | None, typer.Option(help="Version (default: the manifest's).")] = None,
) -> None:
    """Sign an artifact version into the fleet's TUF repository."""
    from edgeos.fleet.packing import pack_artifact

    data, name, version = pack_artifact(kind, path, name=name, version=version)
    with client_from_config() as client:
        row = client.publish(kind, name, version, data)
    console.print(
        f"published {kind}/{name}@{version}: {row['target']} ({row['length']} bytes, "
        f"sha256 {row['sha256'][:12]})",
        highlight=False,
    )


@fleet_app.command()
def audit(
    limit: Annotated[int, typer.Option(help="How many entries, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """The audit log: who did, or was refused, what."""
    with client_from_config() as client:
        rows = client.audit(limit=limit)
    if as_json:
        print_json(rows)
        return
    table = Table("when", "actor", "action", "target", "outcome", "detail")
    for r in rows:
        outcome = r["outcome"] if r["outcome"] == "ok" else f"[red]{r['outcome']}[/]"
        table.add_row(when(r["at"]), Text(r["actor"]), r["action"], Text(r["target"]), outcome,
                      Text(r["detail"] or ""))  # fmt: skip
    console.print(table)
