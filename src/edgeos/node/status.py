"""What ``edgeos node status`` shows: one snapshot of a node, as data.

A running node builds it at ``GET /api/status`` (with its live model host and its own
process's memory); when the node does not answer, the CLI builds it from the data
directory's database, without the parts only the live process knows (uptime, memory,
loaded models), and says so. :meth:`NodeStatus.to_json` and :meth:`NodeStatus.from_json`
are the wire format between the two.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from edgeos import __version__
from edgeos.agents import store
from edgeos.node import tokens
from edgeos.node.service import FLEET_JOIN_FILE
from edgeos.node.usage import database_usage, disk_usage, memory_usage
from edgeos.routing.outbound import outbound_waiting
from edgeos.state import Database, journal, outbox

if TYPE_CHECKING:
    from edgeos.runtime import ModelHost
    from edgeos.runtime.generative import GenerativeHost
    from edgeos.settings import NodeSettings

#: How many recent errors the snapshot carries.
LAST_ERRORS = 5
# When this module was first imported: the process start where /proc cannot tell.
_IMPORTED_AT = time.time()


@dataclass(frozen=True)
class AgentState:
    """An installed agent and its runs by state."""

    name: str
    version: str
    paused: bool
    runs: dict[str, int]


@dataclass(frozen=True)
class LoadedModelState:
    """A model version loaded in the node's model host."""

    name: str
    version: str
    providers: list[str]
    size_bytes: int
    loaded_at: float


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model: how many versions, and which serves by default."""

    name: str
    versions: int
    default: str | None


@dataclass(frozen=True)
class ErrorEntry:
    """A recent failure: a run that failed, or an effect given up on."""

    at: float | None
    kind: str  # "run" or "effect"
    source: str
    message: str


@dataclass(frozen=True)
class Buffers:
    """What is waiting: effects in the outbox by state, questions waiting for people,
    messages for cloud services in the outbound queue."""

    outbox: dict[str, int]
    open_escalations: int
    #: Outbound messages waiting (the batch in flight included), by priority.
    outbound: dict[str, int] = field(default_factory=dict)
    #: Outbound messages dropped by the declared drop order, not yet reported, by priority.
    outbound_dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FleetArtifactState:
    """An artifact the fleet deployed here: the version last switched to, and its state."""

    kind: str
    name: str
    version: str
    #: ``active`` (the last known good), ``failed`` (refused, ``reason`` says why; the
    #: previous version runs) or ``switching`` (being health-checked now).
    state: str
    previous_version: str | None
    reason: str | None
    #: False when the fleet no longer assigns it (it stays installed).
    assigned: bool
    updated_at: float


@dataclass(frozen=True)
class PendingBatchState:
    """The telemetry batch sent (or about to be) and not yet acknowledged."""

    seq: int
    records: int
    bytes: int
    since: float


@dataclass(frozen=True)
class TelemetryState:
    """The telemetry uplink's buffer on this node."""

    #: Records and payload bytes waiting, by kind (alert, kpi, trace, log).
    records: dict[str, int]
    bytes: dict[str, int]
    #: Records dropped (buffer full) since the last batch, by kind.
    dropped: dict[str, int]
    pending_batch: PendingBatchState | None
    #: The last batch the fleet took (or refused for good); None before the first.
    last_acknowledged_seq: int | None
    #: Compressed bytes sent today (UTC), against ``telemetry_bytes_per_day``.
    sent_today_bytes: int


@dataclass(frozen=True)
class MemoryReplicationState:
    """Memory replication to the fleet's backup: the local change log against the
    position the fleet last confirmed."""

    local_seq: int
    fleet_position: int
    behind: int
    confirmed_at: float | None


@dataclass(frozen=True)
class FleetLink:
    """How the node stands with its fleet."""

    url: str | None
    device_id: str | None
    group: str | None
    #: ``online``, ``offline``, ``revoked``, ``certificate expired``, ``enrolling`` or
    #: ``not enrolled``.
    link: str
    link_since: float | None
    last_sync: float | None
    last_error: str | None
    certificate_expires: float | None
    #: True when the node is not running: the link is as it was when the node stopped.
    stale: bool
    artifacts: list[FleetArtifactState] = field(default_factory=list)
    telemetry: TelemetryState | None = None
    #: None until the node is enrolled (memory is replicated as its device).
    memory: MemoryReplicationState | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FleetLink:
        """A link from its JSON form (:meth:`NodeStatus.to_json`, or the fleet report);
        unknown keys from a newer node are ignored."""
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        known["artifacts"] = [FleetArtifactState(**a) for a in doc.get("artifacts", [])]
        telemetry = doc.get("telemetry")
        if telemetry is not None:
            pending = telemetry.get("pending_batch")
            known["telemetry"] = TelemetryState(**{
                **telemetry,
                "pending_batch": None if pending is None else PendingBatchState(**pending),
            })  # fmt: skip
        memory = doc.get("memory")
        if memory is not None:
            known["memory"] = MemoryReplicationState(**memory)
        return cls(**known)

    def summary(self) -> str:
        """One line: the link and who the node is in which fleet."""
        who = f"device {self.device_id} in group {self.group} of {self.url}"
        if self.device_id is None:
            who = f"fleet {self.url}" if self.url else "no fleet URL"
        state = f"link {self.link} when the node stopped" if self.stale else self.link
        error = f": {self.last_error}" if self.last_error and self.link != "online" else ""
        return f"{state} ({who}){error}"


@dataclass(frozen=True)
class NodeStatus:
    """One snapshot of a node."""

    version: str
    running: bool
    collected_at: float
    data_dir: str
    pid: int | None
    started_at: float | None
    listen: str | None
    fleet: str
    agents: list[AgentState]
    models_loaded: list[LoadedModelState]
    models_registered: list[RegisteredModel]
    #: Bytes by part; empty when the node is not running (its memory cannot be read).
    memory: dict[str, int]
    #: The kernel's limit on the node's cgroup (``MemoryMax=``), when there is one.
    memory_limit_bytes: int | None
    memory_budget_bytes: int | None
    model_budget_bytes: int
    disk: dict[str, int]
    buffers: Buffers
    #: The database's share of ``disk`` by part (journal, memory, runs, ...); empty where
    #: SQLite cannot tell.
    database: dict[str, int] = field(default_factory=dict)
    last_errors: list[ErrorEntry] = field(default_factory=list)
    #: The fleet link in detail, when the node follows (or followed) a fleet.
    fleet_link: FleetLink | None = None
    #: Named API tokens by state (active, expired, revoked); the local token is not counted.
    api_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def uptime_seconds(self) -> float | None:
        """Seconds since the node process started, when it is running."""
        if self.started_at is None:
            return None
        return max(0.0, self.collected_at - self.started_at)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types, with the uptime spelled out for scripts."""
        return {**asdict(self), "uptime_seconds": self.uptime_seconds}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> NodeStatus:
        """The reverse of :meth:`to_json` (unknown keys from a newer node are ignored)."""
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        known["agents"] = [AgentState(**a) for a in doc["agents"]]
        known["models_loaded"] = [LoadedModelState(**m) for m in doc["models_loaded"]]
        known["models_registered"] = [RegisteredModel(**m) for m in doc["models_registered"]]
        known["buffers"] = Buffers(**doc["buffers"])
        known["last_errors"] = [ErrorEntry(**e) for e in doc.get("last_errors", [])]
        link = doc.get("fleet_link")
        if link is not None:
            known["fleet_link"] = FleetLink.from_json(link)
        return cls(**known)

    def dumps(self) -> bytes:
        """The snapshot as indented JSON text."""
        return orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


def collect_status(
    db: Database,
    settings: NodeSettings,
    *,
    host: ModelHost | None = None,
    generative: GenerativeHost | None = None,
    started_at: float | None = None,
    running: bool = True,
    now: float | None = None,
    fleet_live: dict[str, Any] | None = None,
) -> NodeStatus:
    """A snapshot of the node whose database is ``db``.

    ``host`` is the live model host (None outside the node: nothing is loaded then, and
    memory is not measured) and ``generative`` its generative one; ``fleet_live`` the running node's fleet link. Blocking: reads
    the database and walks the data directory, so call it off the event loop.
    """
    if host is not None:
        loaded = [
            LoadedModelState(
                m.manifest.name, m.manifest.version, list(m.providers),
                m.size_bytes, m.loaded_at,
            )
            for m in host.loaded()
        ]  # fmt: skip
        memory = memory_usage(
            host.memory_used(), generative.memory_used() if generative is not None else 0
        )
        catalog = host.registry.catalog()
    else:
        loaded, memory = [], {}
        # Imported here: outside the node, the status command does not need the runtime.
        from edgeos.runtime.registry import ModelRegistry

        catalog = ModelRegistry(db, settings.model_store).catalog()
    registered: dict[str, RegisteredModel] = {}
    for manifest, is_default in catalog:
        seen = registered.get(manifest.name)
        registered[manifest.name] = RegisteredModel(
            manifest.name,
            (seen.versions if seen else 0) + 1,
            manifest.version if is_default else (seen.default if seen else None),
        )
    budget = settings.memory_budget_mb
    link = fleet_detail(db, settings.data_dir, fleet_live)
    return NodeStatus(
        version=__version__,
        running=running,
        # When the snapshot was complete: what it read may have happened while it read.
        collected_at=time.time() if now is None else now,
        data_dir=str(settings.data_dir),
        pid=os.getpid() if running else None,
        started_at=started_at if running else None,
        listen=f"{settings.api_scheme}://{settings.host}:{settings.port}" if running else None,
        fleet=link.summary() if link is not None else fleet_link(settings.data_dir),
        agents=[
            AgentState(a.name, a.version, a.paused, store.state_counts(db, a.name))
            for a in store.agents(db)
        ],
        models_loaded=loaded,
        models_registered=list(registered.values()),
        memory=memory,
        memory_limit_bytes=cgroup_memory_limit() if running else None,
        memory_budget_bytes=budget * 1024 * 1024 if budget else None,
        model_budget_bytes=settings.model_memory_budget_mb * 1024 * 1024,
        disk=disk_usage(settings.data_dir),
        database=database_usage(settings.database_path),
        buffers=Buffers(
            outbox.counts(db), len(store.escalations(db, state="open")), *outbound_waiting(db)
        ),
        last_errors=last_errors(db),
        fleet_link=link,
        api_tokens=dict(Counter(t.state for t in tokens.tokens(db))),
    )


def fleet_detail(db: Database, data_dir: Path, live: dict[str, Any] | None) -> FleetLink | None:
    """The fleet link in detail, or None for a node that never followed a fleet."""
    if live is None and not (data_dir / "fleet").is_dir():
        return None
    # Imported here: a node without a fleet does not load the sync package.
    from edgeos.sync.report import fleet_report

    report = fleet_report(db, data_dir, live)
    return None if report is None else FleetLink.from_json(report)


def fleet_link(data_dir: Path) -> str:
    """How a node that has not enrolled stands with a fleet (see :func:`fleet_detail`)."""
    path = data_dir / FLEET_JOIN_FILE
    try:
        url = orjson.loads(path.read_bytes()).get("url")
    except FileNotFoundError:
        return "not enrolled"
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return f"not enrolled ({path} cannot be read)"
    return f"not enrolled (join request for {url} stored; the node enrolls when it runs)"


def last_errors(db: Database, limit: int = LAST_ERRORS) -> list[ErrorEntry]:
    """The most recent failed runs and dead effects, newest first."""
    entries = [
        ErrorEntry(r.finished_at or r.updated_at, "run", f"run {r.id} of {r.agent}",
                   r.error or "failed")
        for r in store.runs(db, state="failed", limit=limit)
    ]  # fmt: skip
    # The outbox row does not record when an effect died; its journal record does.
    rows = db.reader().execute(
        "SELECT key, run_id, connector, operation, last_error, next_attempt_at FROM outbox "
        "WHERE state = ? ORDER BY rowid DESC LIMIT ?",
        (outbox.DEAD, limit),
    )
    for key, run_id, connector, operation, error, last_try in rows.fetchall():
        died = next(
            (
                r.at
                for r in reversed(journal.for_run(db, run_id))
                if r.kind == "effect_dead" and r.payload.get("key") == key
            ),
            last_try,  # the journal record may have gone with retention
        )
        entries.append(
            ErrorEntry(died, "effect", f"effect {key} ({connector}.{operation})", error or "dead")
        )
    entries.sort(key=lambda e: e.at or 0.0, reverse=True)
    return entries[:limit]


def process_started_at() -> float:
    """When this process started (Linux: from /proc; elsewhere: when edgeos was imported)."""
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        # Field 22 of /proc/self/stat, after the parenthesised command name (which may
        # itself hold spaces), is the start time in clock ticks after boot.
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rpartition(")")[2].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    return _IMPORTED_AT


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2), or None without one."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                limit = Path("/sys/fs/cgroup", line[3:].lstrip("/"), "memory.max").read_text()
                return None if limit.strip() == "max" else int(limit)
    return None
