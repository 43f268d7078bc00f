"""How large a fleet one fleet process serves: simulated devices syncing over mTLS.

    python bench/fleet_scale.py [--db sqlite|postgres|both] [--sizes 1000,5000,10000,20000]
                                [--interval 60] [--window 60]

For each database, one real ``edgeos fleet serve`` process; the simulator (in this
process) enrolls devices with their own keys and certificates and has each sync every
``--interval`` seconds, phases spread evenly. Twice: keeping each device's TLS
connection open between syncs, as nodes do, and opening a new one (a full mTLS
handshake) for every sync, the worst case of devices behind links that drop connections.
After each sync a device also sends a telemetry batch, as a node's uplink does (a minute
of one agent's and one model's KPIs with latency sketches; every device runs the same
agent, so every batch updates the same fleet-wide sketch rows); ``--no-telemetry`` leaves
it out. For each fleet size it measures a window of ``--window`` seconds: p50/p99 sync
latency, telemetry p99, errors, and the fleet process's CPU and memory; the largest size
with both p99s under 250 ms and no errors is the figure. Printed beside the published
figures of KubeEdge, the peer that publishes a scale test.
PostgreSQL comes from ``EDGEOS_BENCH_POSTGRES_URL`` or ``EDGEOS_TEST_POSTGRES_URL``; a
database of its own is created on that server and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

from edgeos.fleet.client import FleetClient
from edgeos.fleet.keystore import init_fleet
from edgeos.fleet.settings import FleetConfig
from edgeos.fleet.simulator import Simulation, SimulationConfig
from edgeos.node.process import ServerProcess, free_port

P99_GOAL_MS = 250.0
GOAL_DEVICES = 10_000
PEERS = [
    ("KubeEdge (published)", "100,000 edge nodes", "on a large cloud cluster, not one process"),
    ("edgeos goal", f"{GOAL_DEVICES:,} devices", "one fleet process, 2 cores, p99 < 250 ms"),
]


@dataclass
class Step:
    """One fleet size measured over one window."""

    devices: int
    syncs_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    cpu_percent: float
    rss_mb: float
    simulator_cpu_percent: float
    reconnect: bool
    telemetry_p99_ms: float | None = None
    telemetry_errors: int = 0
    telemetry: bool = False

    @property
    def ok(self) -> bool:
        syncs = self.errors == 0 and self.p99_ms is not None and self.p99_ms < P99_GOAL_MS
        if not self.telemetry:
            return syncs
        p99 = self.telemetry_p99_ms
        return syncs and self.telemetry_errors == 0 and p99 is not None and p99 < P99_GOAL_MS


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@contextlib.contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A fresh database on the server at ``server_url``, dropped afterwards."""
    import psycopg

    name = f"edgeos_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def fleet_process(
    data_dir: Path, db_url: str | None, interval: float
) -> Iterator[tuple[ServerProcess, str, str]]:
    """A real fleet server telling devices to sync every ``interval`` seconds (it keeps
    idle connections that long); yields it, its URL and a join token for every device."""
    config = FleetConfig(data_dir=data_dir, db_url=db_url)
    report = init_fleet(config)
    assert report.admin_token is not None
    ca_pem = (config.keys_dir / "ca.crt").read_text()
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    command = [sys.executable, "-m", "edgeos", "fleet", "serve", "--data", str(data_dir)]
    command += ["--port", str(port), "--log-level", "warning", "--sync-interval", f"{interval}s"]
    if db_url:
        command += ["--db", db_url]
    server = ServerProcess(
        command, url, ready_path="/api/v1/ca", verify=ssl.create_default_context(cadata=ca_pem)
    )
    with server, FleetClient(url, report.admin_token, ca_pem) as client:
        token = client.create_join_token("bench", ttl_s=86400.0, uses=1_000_000)["token"]
        yield server, url, token


async def measure(
    sim: Simulation,
    sizes: list[int],
    window: float,
    pid: int,
    console: Console,
    modes: tuple[bool, ...] = (False, True),
) -> list[Step]:
    """Both connection modes, each growing the fleet size by size until p99 passes the goal."""
    try:
        steps = []
        for reconnect in modes:
            sim.config.keep_alive = not reconnect
            steps += await _grow(sim, sizes, window, pid, console)
            await sim.disconnect()
        return steps
    finally:
        await sim.disconnect()


async def _grow(
    sim: Simulation, sizes: list[int], window: float, pid: int, console: Console
) -> list[Step]:
    steps: list[Step] = []
    for size in sizes:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"enrolling up to {size:,} devices", total=size)
            sim.config.devices = size
            await sim.enroll(partial(_enrolled, progress, task))
        if sim.config.keep_alive:
            # One interval unmeasured, so every device holds its connection: the steady state.
            with console.status(f"{size:,} devices connecting"):
                await sim.run(sim.config.sync_interval)
        cpu0, t0, own0 = _cpu_seconds(pid), time.monotonic(), time.process_time()
        with console.status(f"{size:,} devices syncing every {sim.config.sync_interval:.0f} s"):
            stats = await sim.run(window)
        elapsed = time.monotonic() - t0
        cpu = (_cpu_seconds(pid) - cpu0) / elapsed * 100
        own = (time.process_time() - own0) / elapsed * 100
        sent = sim.telemetry_stats
        step = Step(
            size, stats.rate(), stats.percentile(0.5), stats.percentile(0.99),
            stats.error_count, cpu, _rss_mb(pid), own, not sim.config.keep_alive,
            sent.percentile(0.99), sent.error_count, sim.config.telemetry,
        )  # fmt: skip
        steps.append(step)
        console.print(_row_text(step))
        if not step.ok:
            break
    return steps


def _enrolled(progress: Progress, task: TaskID, done: int) -> None:
    progress.update(task, completed=done)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _latencies(step: Step) -> str:
    """Sync p50 / p99, and the telemetry p99 in brackets when it was sent."""
    sent = f" ({_ms(step.telemetry_p99_ms)} ms)" if step.telemetry else ""
    return f"{_ms(step.p50_ms)} / {_ms(step.p99_ms)} ms{sent}"


def _row_text(step: Step) -> str:
    verdict = "ok" if step.ok else "over the goal"
    mode = "new TLS handshake per sync" if step.reconnect else "kept connections"
    telemetry = (
        f", telemetry p99 {_ms(step.telemetry_p99_ms)} ms ({step.telemetry_errors} errors)"
        if step.telemetry else ""
    )  # fmt: skip
    return (
        f"{mode}, {step.devices:>7,} devices: {step.syncs_per_s:6.1f} syncs/s, p50 {_ms(step.p50_ms)} ms, "
        f"p99 {_ms(step.p99_ms)} ms, {step.errors} errors{telemetry}, fleet CPU "
        f"{step.cpu_percent:.0f}%, RSS {step.rss_mb:.0f} MB (simulator CPU "
        f"{step.simulator_cpu_percent:.0f}%): {verdict}"
    )


def run_database(
    label: str, db_url: str | None, args: argparse.Namespace, console: Console
) -> list[Step]:
    """Every size against one fresh fleet on one database."""
    console.rule(f"fleet on {label}")
    with (
        tempfile.TemporaryDirectory(prefix="edgeos-fleet-bench-") as tmp,
        fleet_process(Path(tmp), db_url, args.interval) as (server, url, token),
    ):
        assert server.process is not None
        config = SimulationConfig(
            url, token, devices=0, sync_interval=args.interval, telemetry=args.telemetry
        )
        sim = Simulation(config)
        try:
            modes = tuple(m == "reconnect" for m in args.modes)
            return asyncio.run(
                measure(sim, args.sizes, args.window, server.process.pid, console, modes)
            )
        finally:
            sim.close()


def _by_mode(results: dict[str, list[Step]]) -> list[tuple[tuple[str, bool], list[Step]]]:
    return [
        ((label, reconnect), [s for s in steps if s.reconnect == reconnect])
        for label, steps in results.items()
        for reconnect in (False, True)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--sizes", type=lambda s: [int(x) for x in s.split(",")],
        default=[1000, 2500, 5000, 10_000, 15_000, 20_000],
    )  # fmt: skip
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument(
        "--modes", type=lambda s: s.split(","), default=["kept", "reconnect"],
        help="kept (connections kept between syncs), reconnect (a handshake per sync), or both",
    )  # fmt: skip
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument(
        "--telemetry", action=argparse.BooleanOptionalAction, default=True,
        help="each device sends a telemetry batch after each sync, as nodes do",
    )  # fmt: skip
    args = parser.parse_args(argv)
    console = Console()
    targets: list[tuple[str, str | None]] = []
    if args.db in ("sqlite", "both"):
        targets.append(("SQLite", None))
    pg = os.environ.get("EDGEOS_BENCH_POSTGRES_URL") or os.environ.get("EDGEOS_TEST_POSTGRES_URL")
    results: dict[str, list[Step]] = {}
    for label, url in targets:
        results[label] = run_database(label, url, args, console)
    if args.db in ("postgres", "both"):
        if pg is None:
            console.print("PostgreSQL: skipped (set EDGEOS_BENCH_POSTGRES_URL)")
        else:
            with postgres_database(pg) as url:
                results["PostgreSQL"] = run_database("PostgreSQL", url, args, console)
    sending = " and sending telemetry" if args.telemetry else ""
    table = Table(
        title=f"fleet scale: devices syncing every {args.interval:.0f} s{sending}, one 2-core host"
    )
    table.add_column("system")
    table.add_column("largest fleet with p99 < 250 ms")
    table.add_column("sync p50 / p99 at that size" + (" (telemetry p99)" if args.telemetry else ""))
    table.add_column("fleet CPU, RSS")
    for (label, reconnect), steps in _by_mode(results):
        good = [s for s in steps if s.ok]
        best = good[-1] if good else None
        mode = "new TLS handshake per sync" if reconnect else "kept connections"
        table.add_row(
            f"edgeos fleet on {label}, {mode}",
            f"{best.devices:,} devices ({best.syncs_per_s:.0f} syncs/s)" if best else "none",
            _latencies(best) if best else "-",
            f"{best.cpu_percent:.0f}%, {best.rss_mb:.0f} MB" if best else "-",
        )
    for name, figure, note in PEERS:
        table.add_row(name, figure, note, "")
    console.print(table)
    tested_max = max(args.sizes)
    for (label, reconnect), steps in _by_mode(results):
        label = f"{label}, {'new TLS handshake per sync' if reconnect else 'kept connections'}"
        reached = max((s.devices for s in steps if s.ok), default=0)
        if reached >= tested_max:
            console.print(
                f"{label}: sustained every size tried (up to {tested_max:,}); more may fit"
            )
        console.print(
            f"{label}: goal of {GOAL_DEVICES:,} devices "
            + ("met" if reached >= GOAL_DEVICES else f"not met (largest {reached:,})")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
