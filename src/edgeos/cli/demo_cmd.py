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
) -> None:
    """Serve the demo models on a real node, measure them, and show the API."""
    from edgeos.demo.showcase import run_demo

    run_demo(models, requests=requests, linger=linger, console=console)
