"""``edgeos fleet rollout ...``: move an artifact version through the fleet in waves.

The commands drive the fleet's operator API (``/api/v1/rollouts``) with the stored login;
the fleet validates and audits everything, so these only shape arguments and show.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Column, Table
from rich.text import Text

from edgeos.cli.common import console
from edgeos.errors import ConfigError

if TYPE_CHECKING:
    from edgeos.fleet.client import FleetClient

rollout_app = typer.Typer(
    help="Roll artifact versions out in waves, with health gates and automatic rollback.",
    no_args_is_help=True,
)

API = "/api/v1/rollouts"
FINAL = ("completed", "halted", "aborted")
_STATUS_STYLE = {"running": "cyan", "paused": "yellow", "completed": "green",
                 "halted": "red", "aborted": "red"}  # fmt: skip

IdArgument = Annotated[str, typer.Argument(help="The rollout's id (ro-...).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


def _client() -> FleetClient:
    # Looked up when used: the fleet commands module registers this one.
    from edgeos.cli.fleet_cmd import client_from_config

    return client_from_config()


def parse_waves(text: str) -> list[int]:
    """``1,10,50,100`` as a list of ints; ConfigError naming --waves otherwise.

    Whether they are valid waves (increasing, ending at 100) is the fleet's to say.
    """
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--waves {text!r}: give comma-separated percentages, e.g. 1,10,50,100"
        ) from None


def parse_soak(text: str) -> float:
    """``10m``, ``30s``, ``1h`` or a number of seconds; ConfigError naming --soak otherwise."""
    from edgeos.manifests.durations import parse_duration

    try:
        # A bare number is seconds; anything else needs its unit.
        seconds = parse_duration(float(text) if _is_number(text) else text)
    except ValueError as exc:
        raise ConfigError(f"--soak: {exc}") from exc
    if not math.isfinite(seconds):
        raise ConfigError(f"--soak {text!r}: give a finite duration")
    return seconds


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@rollout_app.command("create")
def create(
    artifact: Annotated[str, typer.Argument(help="KIND/NAME@VERSION, e.g. model/stockout-risk@4.")],
    target: Annotated[
        str, typer.Option(help="Devices: all, group=G, label:K=V, device=ID; commas AND them.")
    ],
    waves: Annotated[str, typer.Option(help="Cumulative percentages, ending at 100.")] = (
        "1,10,50,100"
    ),
    soak: Annotated[str, typer.Option(help="How long each wave runs before its gates.")] = "10m",
    gate: Annotated[
        list[str] | None,
        typer.Option(
            help="METRIC<=LIMIT: failure_rate, p99_ms, override_rate, drift; "
            "limit 0.05, +0.02 (over baseline) or x1.5 (ratio). Repeat for more."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Start a rollout: wave 1 gets the version now, the next after its soak and gates."""
    body = {"artifact": artifact, "target": target, "waves": parse_waves(waves),
            "soak_s": parse_soak(soak), "gates": gate or []}  # fmt: skip
    with _client() as client:
        doc = client.request("POST", API, json=body)
    if as_json:
        _print_json(doc)
        return
    console.print(f"rollout [bold]{doc['id']}[/] created", highlight=False)
    console.print(render_status(doc))


@rollout_app.command("list")
def list_rollouts(as_json: JsonOption = False) -> None:
    """Every rollout, newest first."""
    with _client() as client:
        rollouts: list[dict[str, Any]] = client.request("GET", API)
    if as_json:
        _print_json(rollouts)
        return
    table = Table(Column("id", no_wrap=True), "artifact", "target", "status", "wave", "devices",
                  "created", "by")  # fmt: skip
    for r in rollouts:
        table.add_row(
            r["id"], Text(r["artifact"]), Text(r["target"]), _status_text(r["status"]),
            f"{r['current_wave']}/{len(r['waves'])}", str(r["devices"]), _when(r["created_at"]),
            Text(r["created_by"]),
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(rollouts)} rollout(s)", highlight=False)


@rollout_app.command("status")
def status(
    rollout_id: IdArgument,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh until completed, halted or aborted.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 2.0,
    as_json: JsonOption = False,
) -> None:
    """Progress per wave: devices on the version, failures, gate verdicts, soak left."""
    with _client() as client:
        doc: dict[str, Any] = client.request("GET", f"{API}/{rollout_id}")
        if as_json:
            _print_json(doc)
            return
        if not watch:
            console.print(render_status(doc))
            return
        from rich.live import Live

        with Live(render_status(doc), console=console, auto_refresh=False) as live:
            while doc["status"] not in FINAL:
                time.sleep(max(0.2, interval))
                doc = client.request("GET", f"{API}/{rollout_id}")
                live.update(render_status(doc), refresh=True)


def _action(name: str, done: str) -> None:
    def command(rollout_id: IdArgument) -> None:
        with _client() as client:
            doc = client.request("POST", f"{API}/{rollout_id}/{name}")
        console.print(f"rollout {rollout_id} {done}", highlight=False)
        console.print(render_status(doc))

    command.__doc__ = {
        "pause": "Stop a running rollout where it is (devices keep what they have).",
        "resume": "Let a paused rollout go on.",
        "abort": "Stop a rollout and roll back every device it moved.",
    }[name]
    rollout_app.command(name)(command)


_action("pause", "paused")
_action("resume", "resumed")
_action("abort", "aborted")


# -- showing a rollout ------------------------------------------------------------------


def render_status(doc: dict[str, Any]) -> RenderableType:
    """A rollout's status as Rich renderables: a headline, one bar per wave, the verdicts."""
    head = Text()
    head.append(f"{doc['id']} ", style="bold")
    head.append(f"{doc['artifact']} → {doc['target']} ({doc['devices']} devices): ")
    head.append_text(_status_text(doc["status"]))
    if doc["status"] in ("running", "paused"):
        head.append(f", wave {doc['current_wave']} of {len(doc['waves'])}")
        remaining = doc.get("soak_remaining_s")
        if remaining:
            head.append(f", soak {_duration(remaining)} left")
        elif remaining == 0:
            head.append(", soaked: waiting for every device to report the version")
    parts: list[RenderableType] = [head]
    gates = ", ".join(doc["gates"]) or "none"
    parts.append(Text(f"soak {_duration(doc['soak_s'])} per wave; gates: {gates}", style="dim"))
    if doc.get("reason"):
        parts.append(Text(doc["reason"], style="red" if doc["status"] == "halted" else ""))

    table = Table("wave", "devices", "progress", "active", "failed", "pending", "state", "gates",
                  box=None, pad_edge=False)  # fmt: skip
    for wave in doc["wave_list"]:
        verdict = wave.get("verdict")
        judged = Text("-")
        if verdict is not None:
            judged = Text("passed", style="green") if verdict["passed"] else Text("failed", "red")
        table.add_row(
            f"{wave['number']} ({wave['percent']}%)", str(wave["devices"]),
            ProgressBar(total=max(1, wave["devices"]), completed=wave["active"], width=30,
                        complete_style="red" if wave["failed"] else "green"),
            str(wave["active"]), str(wave["failed"]), str(wave["pending"]),
            _state_text(wave["state"]), judged,
        )  # fmt: skip
    parts.append(table)
    for wave in doc["wave_list"]:
        verdict = wave.get("verdict")
        for result in (verdict or {}).get("gates", []):
            style = "red" if not result["passed"] else ("yellow" if result["undecided"] else "")
            parts.append(Text(f"  wave {wave['number']}: {result['reason']}", style=style))
    return Group(*parts)


def _status_text(value: str) -> Text:
    return Text(value, style=_STATUS_STYLE.get(value, ""))


def _state_text(value: str) -> Text:
    style = {"passed": "green", "halted": "red", "aborted": "red", "soaking": "cyan"}
    quiet = value in ("waiting", "not started")
    return Text(value, style=style.get(value, "dim" if quiet else ""))


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m {secs:02d}s" if secs else f"{minutes}m"
    return f"{secs}s"


def _when(moment: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment)) if moment else "-"


def _print_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, sort_keys=True))
