"""``edgeos fleet simulate``: many virtual nodes against a real fleet, for load and rehearsal."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.progress import Progress

from edgeos.cli.common import console


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def simulate(
    devices: Annotated[int, typer.Option(min=1, help="How many virtual devices.")],
    fleet: Annotated[str, typer.Option(envvar="EDGEOS_FLEET_URL", help="The fleet's URL.")],
    join_token: Annotated[
        str,
        typer.Option(envvar="EDGEOS_JOIN_TOKEN", help="A join token with at least DEVICES uses."),
    ],
    interval: Annotated[float, typer.Option(help="Seconds between a device's syncs.")] = 60.0,
    duration: Annotated[float, typer.Option(help="Seconds to run after enrolling.")] = 300.0,
    report_every: Annotated[float, typer.Option(help="Seconds between progress lines.")] = 30.0,
    reconnect: Annotated[
        bool,
        typer.Option(help="A new TLS connection for every sync (the worst case), not kept ones."),
    ] = False,
    telemetry: Annotated[
        bool,
        typer.Option(help="Each device also sends a minute of KPIs after each sync, as nodes do."),
    ] = False,
    fail: Annotated[
        list[str] | None,
        typer.Option(
            "--fail",
            help="KIND/NAME@VERSION every device refuses, as a failed health check (repeatable).",
        ),
    ] = None,
) -> None:
    """Enroll DEVICES virtual nodes with their own keys and certificates, then sync them
    over mTLS every INTERVAL seconds, printing sync latency as it goes."""
    from edgeos.fleet.simulator import Simulation, SimulationConfig

    config = SimulationConfig(
        fleet_url=fleet, join_token=join_token, devices=devices, sync_interval=interval,
        fail=frozenset(fail or ()), keep_alive=not reconnect, telemetry=telemetry,
    )  # fmt: skip
    sim = Simulation(config)

    async def main() -> None:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"enrolling {devices:,} devices", total=devices)
            await sim.enroll(lambda done: progress.update(task, completed=done))
        console.print(f"{devices:,} devices enrolled; syncing every {interval:g} s")
        try:
            await report(duration)
        finally:
            await sim.disconnect()

    async def report(duration: float) -> None:
        left = duration
        while left > 0:
            window = min(report_every, left)
            stats = await sim.run(window)
            left -= window
            sent = sim.telemetry_stats
            shown = f"  telemetry p99 {_ms(sent.percentile(0.99))}" if telemetry else ""
            failures = {**stats.errors, **{f"telemetry {k}": n for k, n in sent.errors.items()}}
            errors = ", ".join(f"{n} {kind}" for kind, n in failures.items()) or "no errors"
            console.print(
                f"{stats.rate():7.1f} syncs/s  p50 {_ms(stats.percentile(0.5))}  "
                f"p99 {_ms(stats.percentile(0.99))}{shown}  {errors}",
                highlight=False,
            )

    try:
        asyncio.run(main())
    finally:
        sim.close()
