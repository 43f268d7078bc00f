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
) -> None:
    """Serve the demo models on a real node and measure them, then run the inventory agent.

    The agent senses a simulated store, judges stockout risk with the local model, reorders
    through a supplier service on loopback and asks a scripted operator when unsure; the
    demo ends by itself after ``--duration`` seconds with the agent's KPIs.
    """
    from edgeos.demo.inventory_demo import run_inventory_demo
    from edgeos.demo.showcase import run_demo

    run_demo(models, requests=requests, linger=linger, console=console)
    run_inventory_demo(models, duration=duration, console=console)
