"""What every command shares: the console, the data directory option, model references."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from edgeos.errors import ConfigError
from edgeos.settings import NodeSettings, load_settings

console = Console()
err_console = Console(stderr=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Node data directory (env EDGEOS_DATA_DIR).",
        show_default=False,
    ),
]


def node_settings(data_dir: Path | None, **flags: object) -> NodeSettings:
    """Settings for a command, from its flags, the environment and node.yaml."""
    return load_settings({"data_dir": data_dir, **flags})


def split_ref(ref: str) -> tuple[str, str | None]:
    """``name`` or ``name:version`` → (name, version or None)."""
    name, sep, version = ref.partition(":")
    if not name or (sep and not version):
        raise ConfigError(f"{ref!r} is not a model reference; use NAME or NAME:VERSION")
    return name, version or None
