"""The ``edgeos`` command: every command has help, output is readable, errors are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from edgeos.cli.main import app
from edgeos.settings import settings_markdown
from tests import onnx_models

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def all_commands() -> list[list[str]]:
    """Every command path of the CLI, found by walking the click tree."""
    paths: list[list[str]] = []

    # Typer ships its own copy of click, so look for subcommands rather than a class.
    def walk(command: object, prefix: list[str]) -> None:
        paths.append(prefix)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "edgeos")
def test_every_command_has_help(path: list[str]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    command: Any = typer.main.get_command(app)  # a group down the path, then the command
    for name in path:
        command = command.commands[name]
    assert command.help, f"'{' '.join(path)}' has no help text"


def edgeos(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "edgeos", *args],
        capture_output=True,
        text=True,
        env={"EDGEOS_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        timeout=60,
    )


def test_model_commands_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "node"
    model = onnx_models.mlp(tmp_path / "risk.onnx")
    manifest = tmp_path / "risk.yaml"
    manifest.write_text(yaml.safe_dump({"task": "classification", "labels": ["ok", "out"]}))
    args = ["--data-dir", str(data)]
    result = runner.invoke(
        app, ["model", "add", str(model), "--name", "risk", "--manifest", str(manifest), *args]
    )
    assert result.exit_code == 0, result.output
    assert "added risk:1" in result.output
    assert runner.invoke(app, ["model", "add", str(model), "--name", "risk", *args]).exit_code == 0
    listing = runner.invoke(app, ["model", "list", *args]).output
    assert listing.count("risk") == 2
    shown = yaml.safe_load(runner.invoke(app, ["model", "show", "risk:1", *args]).output)
    assert shown["labels"] == ["ok", "out"]
    assert shown["default"] is True
    assert runner.invoke(app, ["model", "default", "risk:2", *args]).exit_code == 0
    assert (
        yaml.safe_load(runner.invoke(app, ["model", "show", "risk", *args]).output)["version"]
        == "2"
    )
    profile = runner.invoke(
        app, ["model", "profile", "risk:2", "--iterations", "20", "--batch-sizes", "1,4", *args]
    )
    assert profile.exit_code == 0, profile.output
    assert "rows/s" in profile.output
    stored = yaml.safe_load(runner.invoke(app, ["model", "show", "risk:2", *args]).output)[
        "profile"
    ]
    assert [b["batch_size"] for b in stored["batches"]] == [1, 4]
    removed = runner.invoke(app, ["model", "remove", "risk", *args])
    assert "removed risk:1" in removed.output
    assert "removed risk:2" in removed.output
    assert "no models registered" in runner.invoke(app, ["model", "list", *args]).output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model", "show", "ghost"], "no model named 'ghost'"),
        (["model", "remove", "ghost:3"], "no model named 'ghost'"),
        (["model", "add", "{bad}"], "not an ONNX model"),
        (["model", "show", "risk:"], "not a model reference"),
    ],
)
def test_errors_are_one_line_without_traceback(
    tmp_path: Path, args: list[str], message: str
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("garbage")
    args = [str(bad) if a == "{bad}" else a for a in args]
    result = edgeos(*args, data_dir=tmp_path / "node")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert result.stderr.startswith("error:")


def test_bad_setting_is_reported(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgeos", "node", "settings"],
        capture_output=True,
        text=True,
        env={"EDGEOS_DATA_DIR": str(tmp_path), "EDGEOS_PORT": "eighty", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 1
    assert "EDGEOS_PORT: 'eighty' is not a valid int" in result.stderr


def test_node_settings_shows_every_setting(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["node", "settings", "--data-dir", str(tmp_path)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0
    for line in settings_markdown().splitlines()[2:]:
        assert line.split("`")[1] in result.output


def test_version_flag() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("edgeos ")


def test_configuration_doc_lists_every_setting() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert settings_markdown() in doc, "regenerate the table: python -m edgeos.settings"
