"""The resource guard: acts before the box runs out of memory or disk, and says so.

Every ``interval`` seconds (a timer, not a busy loop) it measures the node by part and,
near a budget (90% by default):

* memory: unloads loaded models, least recently used first, until under the budget:
  predictive models, then idle generative ones (a model generating or with requests
  waiting stays);
* disk (the data directory over its budget, or the filesystem's free space under the
  reserve): applies retention now, trims drift observations to a shorter window, then
  checkpoints the WAL and compacts the database, so both files shrink;

and raises an alert (an ERROR log record and ``edgeos_node_guard_alerts_total``) when the
actions were not enough. It never deletes what was accepted but not yet delivered. At its
first pass it also gives a database made before page maps (under 64 MB) one, so that it
can shrink in place later.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeos.node.usage import Usage, disk_usage, memory_usage
from edgeos.state import Database, file_bytes
from edgeos.state.database import DiskFullError
from edgeos.telemetry import MetricsRegistry

if TYPE_CHECKING:
    from edgeos.runtime import ModelHost
    from edgeos.runtime.generative import GenerativeHost

log = logging.getLogger("edgeos.node.guard")
MB = 1024 * 1024
#: A database from before page maps this small gets one at the guard's first pass.
REBUILD_BELOW = 64 * MB


@dataclass(frozen=True)
class Budgets:
    """What the guard holds the node to (0: no budget)."""

    memory_bytes: int = 0
    disk_bytes: int = 0
    disk_reserve_bytes: int = 64 * MB
    high_water: float = 0.9


@dataclass
class GuardReport:
    """One pass: what was measured, what was done, what is still wrong."""

    usage: Usage
    free_disk_bytes: int
    actions: list[str]
    alerts: list[str]


class ResourceGuard:
    """Measures the node and acts near its budgets."""

    def __init__(
        self,
        db: Database,
        data_dir: Path,
        budgets: Budgets,
        *,
        host: ModelHost | None = None,
        generative: GenerativeHost | None = None,
        retention: Callable[[float], object] | None = None,
        metrics: MetricsRegistry | None = None,
        interval: float = 5.0,
    ) -> None:
        self.db = db
        self.data_dir = data_dir
        self.budgets = budgets
        self.host = host
        self.generative = generative
        self.retention = retention
        self.interval = interval
        self.last: GuardReport | None = None
        self._task: asyncio.Task[None] | None = None
        metrics = metrics or MetricsRegistry()
        self._alerts = metrics.counter(
            "edgeos_node_guard_alerts_total", "Budgets the guard could not hold.", ["resource"]
        )
        self._actions = metrics.counter(
            "edgeos_node_guard_actions_total", "What the guard did to stay in budget.", ["action"]
        )
        metrics.collector(self._gauges)

    def start(self) -> None:
        """Check now and then every ``interval`` seconds."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop checking. Safe to call twice."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # a failed check must not stop the guard
                log.exception("resource check failed")
            await asyncio.sleep(self.interval)

    def measure(self) -> tuple[Usage, int]:
        """Usage by part, and the free space on the data directory's filesystem."""
        models = self.host.memory_used() if self.host is not None else 0
        generative = self.generative.memory_used() if self.generative is not None else 0
        usage = Usage(memory_usage(models, generative), disk_usage(self.data_dir))
        return usage, shutil.disk_usage(self.data_dir).free

    def check(self, now: float | None = None) -> GuardReport:
        """One pass: measure, act near a budget, alert if still over."""
        now = time.time() if now is None else now
        usage, free = self.measure()
        actions: list[str] = self._page_map(free) if self.last is None else []
        alerts: list[str] = []
        b = self.budgets
        if b.memory_bytes and usage.memory_total > b.high_water * b.memory_bytes:
            actions += self._free_memory(b.high_water * b.memory_bytes)
            usage, free = self.measure()
            if usage.memory_total > b.memory_bytes:
                alerts.append(
                    f"memory {usage.memory_total // MB} MB is over the node's budget of "
                    f"{b.memory_bytes // MB} MB after unloading models"
                )
        if self._disk_tight(usage, free):
            actions += self._free_disk(now)
            usage, free = self.measure()
            if b.disk_bytes and usage.disk_total > b.disk_bytes:
                alerts.append(
                    f"data directory {usage.disk_total // MB} MB is over its budget of "
                    f"{b.disk_bytes // MB} MB after pruning"
                )
            if free < b.disk_reserve_bytes:
                alerts.append(
                    f"only {free // MB} MB free on the data directory's filesystem "
                    f"(reserve {b.disk_reserve_bytes // MB} MB): writes may fail"
                )
        for action in actions:
            self._actions.inc(action.split(" ")[0])
            log.warning("resource guard: %s", action)
        for alert in alerts:
            self._alerts.inc("memory" if alert.startswith("memory") else "disk")
            log.error("resource guard: %s", alert)
        self.last = GuardReport(usage, free, actions, alerts)
        return self.last

    def _page_map(self, free: int) -> list[str]:
        # A database from before page maps could only shrink by a rebuild, which needs
        # room for two copies: rarely there when the disk is tight. A small one is rebuilt
        # at the first pass, while there is room; writes wait while it runs, once.
        size = file_bytes(self.db.path)
        if size > REBUILD_BELOW or free < 4 * size + self.budgets.disk_reserve_bytes:
            return []
        if self.db.has_page_map():
            return []
        try:
            done = self.db.compact(free_disk=free, rebuild=True)
        except DiskFullError:
            return []
        return [f"gave the database a page map (rebuilt once, {done.freed // 1024} KB freed)"]

    def _disk_tight(self, usage: Usage, free: int) -> bool:
        b = self.budgets
        over_budget = b.disk_bytes and usage.disk_total > b.high_water * b.disk_bytes
        return bool(over_budget) or free < b.disk_reserve_bytes

    def _free_memory(self, target: float) -> list[str]:
        actions: list[str] = []
        hosts = [h for h in (self.host, self.generative) if h is not None]
        for host in hosts:
            for model in host.loaded():  # least recently used first
                if memory_usage(0)["process"] <= target:
                    return actions
                name, version = model.manifest.name, model.manifest.version
                if host.unload(name, version):  # a busy generative model stays
                    actions.append(f"unload model {name}:{version}")
        return actions

    def _free_disk(self, now: float) -> list[str]:
        # On a disk with no room at all even deleting needs some (the WAL grows first): a
        # step the disk refuses is reported and the next one tried; the files stay whole.
        actions: list[str] = []
        steps: list[tuple[str, Callable[[float], list[str]]]] = [
            ("retention", self._apply_retention),
            ("trimming drift observations", self._trim_observations),
            ("compaction", self._compact),
        ]
        for what, step in steps:
            try:
                actions += step(now)
            except DiskFullError:
                actions.append(f"{what} refused: the disk is full")
        return actions

    def _apply_retention(self, now: float) -> list[str]:
        if self.retention is None:
            return []
        self.retention(now)
        return ["retention applied now"]

    def _trim_observations(self, now: float) -> list[str]:
        with self.db.transaction() as conn:
            # Drift needs a window, not history: keep the latest 1,000 per agent and model.
            trimmed = conn.execute(
                "DELETE FROM observations WHERE id NOT IN (SELECT id FROM observations o2 "
                "WHERE o2.agent = observations.agent AND o2.model = observations.model "
                "ORDER BY id DESC LIMIT 1000)"
            ).rowcount
        return [f"trimmed {trimmed} drift observations"] if trimmed else []

    def _compact(self, now: float) -> list[str]:
        # A checkpoint folds the WAL back and truncates its file; compaction hands what
        # retention and trimming freed back to the filesystem (both outside a transaction).
        self.db.checkpoint()
        actions = ["checkpoint WAL"]
        done = self.db.compact(free_disk=shutil.disk_usage(self.data_dir).free)
        if done.freed or done.rebuilt:
            rebuilt = " (rebuilt once to get its page map)" if done.rebuilt else ""
            actions.append(f"compacted the database by {done.freed // 1024} KB{rebuilt}")
        elif done.skipped:
            actions.append(f"compaction skipped: {done.skipped}")
        return actions

    def _gauges(self) -> list[str]:
        report = self.last
        if report is None:
            return []
        lines = [
            "# HELP edgeos_node_memory_bytes Resident memory by part.",
            "# TYPE edgeos_node_memory_bytes gauge",
            *(
                f'edgeos_node_memory_bytes{{part="{p}"}} {v}'
                for p, v in report.usage.memory.items()
            ),
            "# HELP edgeos_node_disk_bytes Data directory by part.",
            "# TYPE edgeos_node_disk_bytes gauge",
            *(f'edgeos_node_disk_bytes{{part="{p}"}} {v}' for p, v in report.usage.disk.items()),
            "# HELP edgeos_node_disk_free_bytes Free space on the data directory's filesystem.",
            "# TYPE edgeos_node_disk_free_bytes gauge",
            f"edgeos_node_disk_free_bytes {report.free_disk_bytes}",
        ]
        return lines
