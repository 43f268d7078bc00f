"""``edgeos runs migrate|accept|receive|reclaim|verify``: a run moved to another node by
file or through the fleet (or taken back when its envelope expired unaccepted), and its
journal checked across every node it ran on.

A run moves only between devices enrolled in the same fleet: the envelope is signed with
this device's key and certificate and checked against the fleet CA on arrival.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgeos.cli.common import DataDirOption, console, err_console, node_settings
from edgeos.errors import ConfigError
from edgeos.state import Database

if TYPE_CHECKING:
    from edgeos.agents.migration import Signer, Trust


@contextmanager
def _node(data_dir: Path | None) -> Iterator[tuple[Database, Path]]:
    settings = node_settings(data_dir)
    with Database(settings.database_path) as db:
        yield db, settings.data_dir


def _fleet_files(data_dir: Path) -> tuple[str, Path, Path, Path]:
    """(device id, key, certificate, CA) of an enrolled node; ConfigError otherwise."""
    from edgeos.sync.identity import FleetPaths, load_identity

    identity = load_identity(data_dir)
    if identity is None:
        raise ConfigError(
            f"{data_dir} is not enrolled in a fleet: runs move only between enrolled devices "
            "(edgeos node run --fleet URL --join-token TOKEN)"
        )
    paths = FleetPaths.of(data_dir)
    return identity.device_id, paths.key, paths.cert, paths.ca


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc


def signer(data_dir: Path) -> Signer:
    """This device as the sealer of envelopes."""
    from edgeos.agents.migration import Signer
    from edgeos.security import load_private_key

    device_id, key, cert, _ = _fleet_files(data_dir)
    return Signer(device_id, load_private_key(key), _read(cert))


def trust(data_dir: Path) -> Trust:
    """What this device trusts: the fleet CA, less the certificates the fleet revoked as
    the node last heard (it fetches them before it takes runs from the fleet)."""
    from edgeos.sync.run_relay import trust as device_trust

    device_id, _, _, _ = _fleet_files(data_dir)
    return device_trust(data_dir, device_id)


def migrate(
    run_id: str,
    to: Annotated[str, typer.Option("--to", help="Device id of the node that continues it.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the envelope to this file.")
    ] = None,
    via_fleet: Annotated[
        bool, typer.Option("--via-fleet", help="Send the envelope through the fleet.")
    ] = False,
    ttl: Annotated[float, typer.Option(help="Seconds the envelope may wait to be accepted.")] = (
        3600.0
    ),
    data_dir: DataDirOption = None,
) -> None:
    """Seal a run into a signed envelope for another node; it stops here."""
    from edgeos.agents.migration import seal

    if (out is None) == (not via_fleet):
        raise ConfigError("say where the envelope goes: --out FILE or --via-fleet")
    with _node(data_dir) as (db, directory):
        envelope = seal(db, run_id, signer=signer(directory), destination=to, ttl=ttl)
    lost = (
        f"the run stays sealed here: once its envelope expires, 'edgeos runs reclaim {run_id}' "
        "continues it here"
    )
    if out is not None:
        from edgeos.files import write_atomic

        try:
            write_atomic(out, envelope.to_bytes(), 0o600)  # it holds the run's data
        except OSError as exc:
            raise ConfigError(f"{out} cannot be written ({exc.strerror or exc}); {lost}") from exc
        where = f"in {out}; accept it there with 'edgeos runs accept {out.name}'"
    else:
        import asyncio

        from edgeos.errors import EdgeOSError
        from edgeos.sync.run_relay import send_from

        try:
            asyncio.run(send_from(directory, envelope))
        except EdgeOSError:
            err_console.print(f"run {run_id} not sent: {lost}", highlight=False)
            raise
        where = "through the fleet; it takes the run over at its next sync"
    console.print(
        f"run {run_id} sealed for device {to} ({len(envelope.records)} records, "
        f"{len(envelope.effects)} effect(s) handed over) {where}",
        highlight=False,
    )


def receive(data_dir: DataDirOption = None) -> None:
    """Take over now the runs other devices sent this one through the fleet."""
    import asyncio

    from edgeos.sync.run_relay import receive_at

    with _node(data_dir) as (db, directory):
        taken = asyncio.run(receive_at(db, directory))
    for done in taken:
        console.print(f"run {done.run_id} taken over from device {done.source}", highlight=False)
    if not taken:
        console.print("no run waits for this device")


def accept_envelope(path: Path, data_dir: DataDirOption = None) -> None:
    """Check an envelope and continue its run on this node."""
    from edgeos.agents.migration import accept, parse

    envelope = parse(_read(path), source=str(path))
    with _node(data_dir) as (db, directory):
        done = accept(db, envelope, trust=trust(directory))
    console.print(
        f"run {done.run_id} accepted from device {done.source}"
        f"{' (back home)' if done.returned else ''}: continues at step "
        f"{envelope.run.next_step}, {done.effects} effect(s) to deliver",
        highlight=False,
    )


def reclaim_run(run_id: str, data_dir: DataDirOption = None) -> None:
    """Continue a run here whose envelope expired before any node accepted it."""
    from edgeos.agents.migration import reclaim

    with _node(data_dir) as (db, _):
        done = reclaim(db, run_id)
    console.print(
        f"run {run_id} taken back from envelope {done.envelope_id}: it continues here, "
        f"{done.effects} effect(s) to deliver",
        highlight=False,
    )


def verify_run(run_id: str, data_dir: DataDirOption = None) -> None:
    """Check one run's journal across every node it ran on."""
    from edgeos.agents.migration import verify_run as verify

    with _node(data_dir) as (db, directory):
        try:
            ca: str | None = trust(directory).ca_pem
        except ConfigError:  # not enrolled: signatures are still checked, not the CA
            ca = None
        result = verify(db, run_id, ca_pem=ca)
    via = " via " + ", ".join(result.hops) if result.hops else ""
    if result.ok:
        console.print(f"run {run_id} intact: {result.checked} records verified{via}")
        return
    console.print(
        f"[bold red]run {run_id} broken[/] at record {result.first_bad_seq}: {result.reason}",
        highlight=False,
    )
    raise typer.Exit(1)
