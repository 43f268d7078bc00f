"""``edgeos demo``: the first thing a new user runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeos.cli.common import console


def demo(
    models: Annotated[
        Path, typer.Option(help="Where the demo models are (built there if missing).")
    ] = Path("var/demo-models"),
    requests: Annotated[int, typer.Option(help="Inferences per model version.")] = 300,
    linger: Annotated[float, typer.Option(help="Seconds to leave the API up at the end.")] = 5.0,
    duration: Annotated[
        float,
        typer.Option(
            min=1.0,
            help="Seconds the inventory agent trades (one simulated store day a second).",
        ),
    ] = 20.0,
    fleet: Annotated[
        bool,
        typer.Option(
            help="Also run a fleet on loopback, enroll the agent's node in it and show its "
            "dashboard (URL and login printed at the start)."
        ),
    ] = True,
) -> None:
    """Serve the demo models on a real node and measure them, then run the inventory agent.

    The agent senses a simulated store, judges stockout risk with the local model, reorders
    through a supplier service on loopback and asks a scripted operator when unsure; the
    demo ends by itself after ``--duration`` seconds with the agent's KPIs. With the
    fleet (the default), the agent's node sends its runs, traces and KPIs to a fleet on
    loopback whose dashboard is up while the demo runs.
    """
    import contextlib

    from edgeos.demo.fleet import DemoFleet, login_lines
    from edgeos.demo.inventory_demo import run_inventory_demo
    from edgeos.demo.showcase import run_demo

    with contextlib.ExitStack() as stack:
        demo_fleet = None
        if fleet:
            with console.status("starting the demo fleet"):
                demo_fleet = stack.enter_context(DemoFleet())
            for line in login_lines(demo_fleet):
                console.print(line, highlight=False, markup=False, soft_wrap=True)
        run_demo(models, requests=requests, linger=linger, console=console)
        run_inventory_demo(models, duration=duration, console=console, fleet=demo_fleet)
