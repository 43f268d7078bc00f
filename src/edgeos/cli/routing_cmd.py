"""``edgeos routing stats|check``: where agents' calls ran, what they cost, and the venues."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from edgeos.cli.common import DataDirOption, console, node_settings
from edgeos.errors import EdgeOSError
from edgeos.state import Database

if TYPE_CHECKING:
    from edgeos.routing.venues import Venue

app = typer.Typer(
    help="Venue decisions: cost per decision and saving; venue checks.", no_args_is_help=True
)


@app.command()
def stats(
    agent: Annotated[str | None, typer.Option(help="Only this agent.")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Cost per decision by venue, and the saving against all-cloud, per agent."""
    from edgeos.routing.stats import agent_costs

    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        found = agent_costs(db, agent)
    if not found:
        console.print("no routed calls in the journal")
        return
    table = Table("agent", "venue", "calls", "cost", "per call")
    for costs in found:
        for venue, (calls, cost) in sorted(costs.by_venue.items()):
            table.add_row(costs.agent, venue, str(calls), f"{cost:.6f}", f"{cost / calls:.6f}")
    console.print(table)
    for costs in found:
        escalated = f"{costs.escalations} escalated"
        if costs.late_escalations:
            escalated += f", {costs.late_escalations} answered too late: the edge answer stood"
        console.print(
            f"{costs.agent}: {costs.decisions} decisions ({escalated}), "
            f"cost {costs.cost:.6f} ({costs.cost_per_decision:.6f} per decision), all-cloud "
            f"{costs.all_cloud_cost:.6f}, saved {costs.saving:.6f}",
            highlight=False,
        )


@app.command()
def deferred(
    every: Annotated[bool, typer.Option("--all", help="Settled calls too.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Routed calls waiting for an offline venue (and, with --all, how they ended)."""
    from datetime import UTC, datetime

    from edgeos.routing.deferral import queue

    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        calls = queue(db, state=None if every else "waiting")
    if not calls:
        console.print("no deferred calls")
        return
    table = Table("call", "model", "waiting for", "state", "deadline", "default")
    for call in calls:
        deadline = datetime.fromtimestamp(call.deadline, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(call.id, call.model, ", ".join(call.awaiting), call.state, deadline,
                      "declared" if call.default is not None else "none")  # fmt: skip
    console.print(table)


@app.command()
def check(data_dir: DataDirOption = None) -> None:
    """Read venues.yaml and probe each remote venue once (GET /v2/health/ready)."""
    from edgeos.connectors.vault import Vault, load_key
    from edgeos.routing.build import build_router
    from edgeos.routing.config import load_venues
    from edgeos.routing.v2_venue import ClientCertificate
    from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
    from edgeos.sync.identity import FleetPaths, load_identity

    settings = node_settings(data_dir)
    path = settings.data_dir / "venues.yaml"
    if not path.exists():
        console.print(f"no {path}: calls run on this node's model host only")
        return
    config = load_venues(path)
    identity, paths = load_identity(settings.data_dir), FleetPaths.of(settings.data_dir)
    with Database(settings.database_path) as db:
        host = ModelHost(ModelRegistry(db, settings.model_store), HostConfig())
        vault: Vault | None = None

        def secret(name: str, scope: str) -> str:
            # Opened on first use, as the node does: only venues with an API key need it.
            nonlocal vault
            if vault is None:
                vault = Vault(db, load_key(settings.data_dir))
            return vault.get(name, scope=scope)

        router = build_router(
            host, config, source=str(path),
            fleet_url=identity.url if identity else settings.fleet_url,
            certificate=ClientCertificate(paths.ca, paths.cert, paths.key),
            secrets=secret,
        )  # fmt: skip
        failed = 0
        try:
            for venue in router.venues:
                if venue.info.on_device:
                    console.print(f"{venue.info.name}: this node's model host")
                    continue
                if router.monitor.probe(venue.info.name):
                    rtt = router.monitor.state(venue.info.name).rtt_ms or 0.0
                    console.print(f"{venue.info.name}: online ({rtt:.1f} ms)", highlight=False)
                    failed += _check_models(venue)
                else:
                    failed += 1
                    error = router.monitor.state(venue.info.name).last_error
                    console.print(f"[red]{venue.info.name}: offline[/] ({error})", highlight=False)
        finally:
            router.close()
            host.close()
    if failed:
        raise typer.Exit(1)


def _check_models(venue: Venue) -> int:
    """Ask a V2 venue for each model it is declared to serve; how many it does not."""
    from edgeos.routing.v2_venue import V2Venue

    missing = 0
    if isinstance(venue, V2Venue):
        for asked, offer in sorted(venue.info.models.items()):
            try:
                venue.input_datatypes(offer.model)
            except EdgeOSError as exc:
                missing += 1
                console.print(f"[red]  {asked} ({offer.model}): {escape(str(exc))}[/]")
            else:
                console.print(f"  {asked} ({offer.model}): served", highlight=False)
    return missing
