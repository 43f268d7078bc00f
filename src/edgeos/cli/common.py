"""What every command shares: the console, the data directory option, model references."""

from __future__ import annotations

import os
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


#: A token for the node's API other than the local one (a named token, for scripts).
NODE_TOKEN_ENV = "EDGEOS_NODE_TOKEN"


def node_token(settings: NodeSettings) -> str | None:
    """The token a command presents to the node's API: ``EDGEOS_NODE_TOKEN``, else the
    node's local token when this user can read it, else None (the node will say why)."""
    from edgeos.errors import AuthenticationError
    from edgeos.node.tokens import read_local_token

    if os.environ.get(NODE_TOKEN_ENV):
        return os.environ[NODE_TOKEN_ENV]
    try:
        return read_local_token(settings.data_dir)
    except AuthenticationError:
        return None


def lifetime(expires: str | None) -> float | None:
    """Seconds of an ``--expires`` option (``30d``), None when not given; ConfigError
    naming the option when it is not a duration."""
    # Here, not at the top: the module imports pydantic, and every command (`node run`
    # too) imports this file; see tests/test_footprint.py.
    from edgeos.manifests.durations import parse_duration

    try:
        return parse_duration(expires) if expires else None
    except ValueError as exc:
        raise ConfigError(f"--expires: {exc}") from exc


def split_ref(ref: str) -> tuple[str, str | None]:
    """``name`` or ``name:version`` → (name, version or None)."""
    name, sep, version = ref.partition(":")
    if not name or (sep and not version):
        raise ConfigError(f"{ref!r} is not a model reference; use NAME or NAME:VERSION")
    return name, version or None


def size(n: float) -> str:
    """Bytes for people: ``812 B``, ``3.4 MB`` (binary units, as ``du -h`` counts)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
