"""The footprint of a node on this machine, next to KubeEdge's edgecore and the Greengrass nucleus.

Measured on real ``edgeos node run`` processes (``python -m edgeos node run``):

* start-up: from spawning the process to the first 200 on ``/v2/health/ready``, the
  median of ``--starts`` starts (the first on an empty data directory, the others on the
  directory it left, as a restart);
* an idle node (empty data directory: no model, no agent): resident memory once ready,
  then CPU time used over ``--idle-seconds``, and whether numpy or ONNX Runtime got loaded;
* a node running the demo's inventory agent with its model (the ``edgeos demo`` set-up:
  simulated store, supplier on loopback, scripted operator) for ``--agent-seconds``: its
  resident memory (the node's plus any worker process it started) at peak and in steady
  state (the median over the run's second half), what that memory
  holds by mapping (anonymous memory, and the shared libraries by package) and how the
  data directory grew, extrapolated to a day: linearly, but for the trace spans, which
  the node keeps a fixed number of (``trace_keep_spans``), counted at that number. Measured twice: as ``edgeos demo``
  runs it, with long-term memory on ``--embedding-model`` (when that file exists: ``make
  embedding-model``), and without memory, comparable with figures taken before the agent
  had any;
  Library pages count as the kernel maps them: one that keeps a library's file in large
  page-cache folios maps a whole folio at the first touch, so the same node measures up
  to ~13 MB more after the files were read in bulk than after they were just written
  (seen on Linux 6.18 with ext4); the by-mapping line shows it under the libraries;
* the floor under each of those: a bare process (``bench/model_floor.py``) that imports
  numpy and ONNX Runtime and holds the same models with the node's session and heap
  settings, and nothing else: what any node running them takes at the least, here;
* the installation: bytes on disk of the distributions ``edgeos`` requires at run time
  (read with importlib.metadata, followed through their own requirements and extras),
  plus the edgeos package itself; the Python interpreter is not counted.

Published minimums for comparison: KubeEdge's edgecore "memory footprint down to ~70 MB",
the AWS IoT Greengrass nucleus (Java) 96 MB of RAM.

    python bench/footprint.py [--models var/demo-models] [--idle-seconds 60]
                              [--agent-seconds 60] [--starts 5]
                              [--embedding-model var/embedding-models/all-minilm-l6-v2.onnx]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx
from packaging.requirements import Requirement
from rich.console import Console
from rich.table import Table

import edgeos
from edgeos.agents import store
from edgeos.demo.inventory_demo import AGENT, EMBEDDING_MODEL, MODEL, install, write_connectors
from edgeos.demo.knowledge import FILL_RATES
from edgeos.demo.operator import ScriptedOperator
from edgeos.demo.store import (
    STORE_DB_ENV,
    StoreFeeder,
    StoreSimulator,
    create_store,
    sales_export,
)
from edgeos.demo.supplier import SupplierService
from edgeos.demo.train import build_demo_models
from edgeos.node.process import node_process
from edgeos.node.usage import disk_usage, table_usage, tree_bytes
from edgeos.settings import load_settings
from edgeos.state import Database
from edgeos.telemetry.process import process_cpu_seconds, process_rss_bytes

MB = 1024 * 1024
EDGECORE_MB = 70  # KubeEdge: "memory footprint down to ~70MB"
GREENGRASS_MB = 96  # AWS IoT Greengrass nucleus: minimum RAM
GOAL_IDLE_MB = 50
GOAL_AGENT_MB = 100
GOAL_READY_S = 2.0
GOAL_IDLE_CPU = 0.01  # of one core

# Shared libraries whose presence in /proc/PID/maps shows a heavy import.
NUMPY_LIB = "_multiarray_umath"
ORT_LIB = "onnxruntime_pybind11_state"
TOKENIZERS_LIB = "/tokenizers/"  # the package's native library


def mapped(pid: int, marker: str) -> bool:
    """Whether process ``pid`` has a file whose path contains ``marker`` mapped."""
    try:
        return marker in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (its worker processes and theirs)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone while we looked
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


def tree_rss(pid: int) -> int | None:
    """Resident memory of ``pid`` plus every process below it; None once ``pid`` is gone."""
    own = process_rss_bytes(pid)
    if own is None:
        return None
    return own + sum(process_rss_bytes(child) or 0 for child in descendants(pid))


_SITE = re.compile(r"/site-packages/([^/]+)/")
_SONAME = re.compile(r"^(lib[\w+-]+?)(?:[-.][\d.]+)?\.so")


def _holder(path: str) -> str:
    """Who a mapping's resident memory is charged to: anonymous memory (heap, stacks,
    Python objects, arenas), the Python package whose library it is, or the library."""
    if not path.startswith("/"):
        return "anonymous (heap, Python objects, arenas, stacks)"
    if path.endswith(".onnx"):
        return "model files"
    site = _SITE.search(path)
    if site is not None:
        return site.group(1).removesuffix(".libs")  # numpy.libs holds numpy's OpenBLAS
    name = Path(path).name
    soname = _SONAME.match(name)
    return soname.group(1) if soname else name


def rss_by_holder(pid: int) -> dict[str, int]:
    """Resident bytes of process ``pid`` by :func:`_holder`, largest first (Linux)."""
    totals: dict[str, int] = {}
    holder = ""
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            holder = _holder(fields[5] if len(fields) > 5 else "")
        elif fields and fields[0] == "Rss:":
            totals[holder] = totals.get(holder, 0) + int(fields[1]) * 1024
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


# -- start-up ---------------------------------------------------------------------------
def time_to_ready(data_dir: Path, timeout: float = 30.0) -> float:
    """Seconds from spawning a node to its first 200 on /v2/health/ready; then stops it."""
    node = node_process(data_dir)
    start = time.perf_counter()
    process = subprocess.Popen(node.command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=node.url, timeout=1.0) as client:
            while time.perf_counter() - start < timeout:
                if process.poll() is not None:
                    raise RuntimeError(f"the node exited with {process.returncode} at start-up")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/v2/health/ready").status_code == 200:
                        return time.perf_counter() - start
                time.sleep(0.005)  # fine-grained: the figure is in tenths of a second
        raise RuntimeError(f"the node was not ready after {timeout:.0f} s")
    finally:
        process.terminate()
        process.wait(15)


# -- an idle node -----------------------------------------------------------------------
@dataclass(frozen=True)
class Idle:
    """An idle node, measured."""

    rss_ready: int
    rss_end: int
    cpu_seconds: float
    seconds: float
    numpy_loaded: bool
    ort_loaded: bool

    @property
    def cpu_share(self) -> float:
        """CPU time over wall time: the share of one core."""
        return self.cpu_seconds / self.seconds

    @property
    def rss(self) -> int:
        """The larger of the two readings."""
        return max(self.rss_ready, self.rss_end)


def measure_idle(data_dir: Path, seconds: float) -> Idle:
    """Start a node on ``data_dir``, let it settle, then watch it do nothing."""
    with node_process(data_dir) as node:
        assert node.process is not None
        pid = node.process.pid
        time.sleep(1.0)  # the first scan of the executor, retention, gc.freeze
        rss_ready = process_rss_bytes(pid) or 0
        cpu_before = process_cpu_seconds(pid) or 0.0
        started = time.perf_counter()
        time.sleep(seconds)
        cpu = (process_cpu_seconds(pid) or 0.0) - cpu_before
        elapsed = time.perf_counter() - started
        return Idle(
            rss_ready, process_rss_bytes(pid) or 0, cpu, elapsed,
            mapped(pid, NUMPY_LIB), mapped(pid, ORT_LIB),
        )  # fmt: skip


# -- the demo agent ---------------------------------------------------------------------
@dataclass
class AgentRun:
    """A node running the demo agent, measured."""

    seconds: float
    memory_notes: int | None = None
    """Notes the agent was given in its long-term memory; None: it ran without memory."""
    rss_samples: list[int] = field(default_factory=list)
    """The node's resident memory plus its worker processes', every quarter second."""
    workers: int = 0
    """The most worker processes seen below the node."""
    holders: dict[str, int] = field(default_factory=dict)
    """The node process's resident memory by holder (:func:`rss_by_holder`) at the end."""
    ort_loaded: bool = False
    tokenizers_loaded: bool = False
    runs: dict[str, int] = field(default_factory=dict)
    disk_before: dict[str, int] = field(default_factory=dict)
    disk_after: dict[str, int] = field(default_factory=dict)
    tables_before: dict[str, int] = field(default_factory=dict)
    tables_after: dict[str, int] = field(default_factory=dict)
    """Bytes of the node database's pages by table (its indexes included)."""
    span_rows: int = 0
    keep_spans: int = 0
    floor: dict[str, int] = field(default_factory=dict)
    """What a bare process holding the same models takes (``bench/model_floor.py``)."""

    @property
    def rss_peak(self) -> int:
        """Highest resident memory seen while the agent ran."""
        return max(self.rss_samples, default=0)

    @property
    def rss_steady(self) -> int:
        """Resident memory once settled: the median of the samples of the run's second
        half (the first holds start-up: models loading, the first runs)."""
        later = self.rss_samples[len(self.rss_samples) // 2 :]
        return int(statistics.median(later)) if later else 0

    @property
    def database_growth(self) -> int:
        """Bytes the node database grew by over the run."""
        return max(0, self.disk_after.get("database", 0) - self.disk_before.get("database", 0))

    def table_growth(self, table: str) -> int:
        """Bytes ``table`` grew by over the run."""
        return max(0, self.tables_after.get(table, 0) - self.tables_before.get(table, 0))

    @property
    def growth_per_day(self) -> float:
        """Bytes the data directory grows per day, extrapolated from this run: linearly,
        but the spans table, which holds at most ``keep_spans`` rows, at that size."""
        grown = max(0, sum(self.disk_after.values()) - sum(self.disk_before.values()))
        spans = self.table_growth("spans")
        per_day = (grown - spans) * 86_400 / self.seconds
        if self.span_rows:
            per_day += min(spans * 86_400 / self.seconds, spans / self.span_rows * self.keep_spans)
        return per_day

    @property
    def disk_day(self) -> float:
        """The data directory after a day: as installed, plus a day's growth."""
        return sum(self.disk_before.values()) + self.growth_per_day


def measure_agent(
    models_dir: Path,
    root: Path,
    seconds: float,
    seed: int = 3,
    *,
    embedding_model: Path | None = None,
) -> AgentRun:
    """The demo's inventory agent on a real node for ``seconds`` (as ``edgeos demo`` sets
    it up, without the progress display); with long-term memory on ``embedding_model``
    when given, as the demo runs it when the model file exists."""
    built = build_demo_models(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    data_dir, store_db = root / "node", root / "store.db"
    simulator = StoreSimulator(1, 12, seed=seed)
    simulator.fast_forward(290)
    result = AgentRun(seconds)
    with contextlib.ExitStack() as stack:
        supplier = stack.enter_context(
            SupplierService(drop_reply_rate=0.1, seed=seed, fill_rates=FILL_RATES)
        )
        feeder = StoreFeeder(store_db, simulator, shipments=supplier.take_shipments)
        create_store(store_db, feeder.lanes, seed=seed)
        connectors = write_connectors(data_dir, supplier.url, sales_export(store_db))
        notes = install(
            data_dir, built.models[MODEL], built.manifests[MODEL], connectors, embedding_model
        )
        result.memory_notes = None if embedding_model is None else notes
        result.disk_before = disk_usage(data_dir)
        result.tables_before = table_bytes(data_dir / "node.db")[0]
        node = node_process(data_dir)
        # The agent's runs have no input: the node tells them where the store is.
        node.env = {**(node.env or {}), STORE_DB_ENV: str(store_db)}
        stack.enter_context(node)
        assert node.process is not None
        pid = node.process.pid
        feeder.start()
        stack.callback(feeder.stop)
        stack.enter_context(
            ScriptedOperator(node.url, override_rate=0.25, seed=seed, token=node.token)
        )
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            rss = tree_rss(pid)
            if rss is not None:
                result.rss_samples.append(rss)
            result.workers = max(result.workers, len(descendants(pid)))
        result.ort_loaded = mapped(pid, ORT_LIB)
        result.tokenizers_loaded = mapped(pid, TOKENIZERS_LIB)
        result.holders = rss_by_holder(pid)
        with Database(data_dir / "node.db") as db:
            result.runs = store.state_counts(db, AGENT)
    # The node has stopped (SIGTERM, clean shutdown): the database is closed and settled.
    result.disk_after = disk_usage(data_dir)
    result.tables_after, result.span_rows = table_bytes(data_dir / "node.db")
    result.keep_spans = load_settings({"data_dir": data_dir}).trace_keep_spans
    models = [built.models[MODEL], *([] if embedding_model is None else [embedding_model])]
    result.floor = model_floor(models)
    return result


def model_floor(models: list[Path]) -> dict[str, int]:
    """``bench/model_floor.py`` on ``models``: the resident memory of a process that holds
    them and nothing else (``bare``: before loading them; ``steady``; ``peak``)."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("model_floor.py")), *map(str, models)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    floor: dict[str, int] = json.loads(done.stdout)
    return floor


def table_bytes(path: Path) -> tuple[dict[str, int], int]:
    """(bytes of pages per table, its indexes counted with it; rows in ``spans``)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        spans = conn.execute("SELECT count(*) FROM spans").fetchone()[0]
    return table_usage(path) or {}, int(spans)


# -- the installation -------------------------------------------------------------------
def runtime_distributions(root: str = "edgeos") -> set[str]:
    """``root`` and every distribution it needs at run time, by installed metadata.

    Requirements are followed with their extras (``uvicorn[standard]``) and markers as they
    evaluate here; the ``dev`` and other optional extras of ``root`` are left out.
    """
    found: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (an optional requirement)
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        found.add(key)
        environments = [{"extra": e} for e in extras] or [{"extra": ""}]
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((req.name, frozenset(req.extras)))
    return found


def installation_bytes() -> dict[str, int]:
    """Bytes on disk per runtime distribution (edgeos counted from its package directory,
    since an editable install lists no source files)."""
    sizes: dict[str, int] = {}
    for name in sorted(runtime_distributions()):
        dist = metadata.distribution(name)
        total = 0
        for item in dist.files or []:
            with contextlib.suppress(OSError):
                total += Path(str(item.locate())).stat().st_size
        sizes[name] = total
    sizes["edgeos"] = sizes.get("edgeos", 0) + tree_bytes(Path(edgeos.__file__).parent)
    return sizes


# -- the report -------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / MB:.1f} MB"


def verdict(ok: bool) -> str:
    """The goal column's word."""
    return "met" if ok else "NOT met"


def _holders_line(agent: AgentRun, top: int = 8) -> str:
    shown = list(agent.holders.items())[:top]
    rest = sum(agent.holders.values()) - sum(size for _, size in shown)
    return ", ".join(f"{name} {_mb(size)}" for name, size in shown) + f", other {_mb(rest)}"


def report(
    console: Console,
    *,
    starts: list[float],
    idle: Idle,
    agents: list[AgentRun],
    install: dict[str, int],
) -> bool:
    """Print the side-by-side table and the notes; True when every goal is met.

    ``agents`` are the demo node's runs, as the demo runs it first (with memory when the
    embedding model exists); the goal is judged on that one.
    """
    ready = statistics.median(starts)
    demo = agents[0]
    goals = {
        "idle": idle.rss < GOAL_IDLE_MB * MB,
        "agent": demo.rss_peak < GOAL_AGENT_MB * MB,
        "ready": ready < GOAL_READY_S,
        "cpu": idle.cpu_share < GOAL_IDLE_CPU,
    }
    table = Table(
        "measure", "edgeos node", "goal", "", "edgecore (KubeEdge)", "Greengrass nucleus",
        title="Footprint of an edgeos node on this machine vs published minimums",
    )  # fmt: skip
    table.add_row(
        "resident memory, idle (no model, no agent)", _mb(idle.rss),
        f"< {GOAL_IDLE_MB} MB", verdict(goals["idle"]), f"{EDGECORE_MB} MB", f"{GREENGRASS_MB} MB",
    )  # fmt: skip
    for agent in agents:
        what = "resident memory, demo agent + model" + (
            " + memory" if agent.memory_notes is not None else ", no memory"
        )
        table.add_row(
            f"{what} (peak)", _mb(agent.rss_peak),
            *((f"< {GOAL_AGENT_MB} MB", verdict(goals["agent"])) if agent is demo else ("", "")),
            "-", "-",
        )  # fmt: skip
        table.add_row(f"{what} (steady)", _mb(agent.rss_steady), "", "", "-", "-")
        if agent.floor:
            models = "models" if agent.memory_notes is not None else "model"
            table.add_row(
                f"  floor: Python + numpy + ONNX Runtime + the same {models} alone (peak / steady)",
                f"{_mb(agent.floor['peak'])} / {_mb(agent.floor['steady'])}", "", "", "-", "-",
            )  # fmt: skip
    table.add_row(
        f"start-up to ready (median of {len(starts)})", f"{ready:.2f} s",
        f"< {GOAL_READY_S:g} s", verdict(goals["ready"]), "-", "-",
    )  # fmt: skip
    table.add_row(
        f"idle CPU over {idle.seconds:.0f} s", f"{idle.cpu_share:.2%} of a core",
        f"< {GOAL_IDLE_CPU:.0%}", verdict(goals["cpu"]), "-", "-",
    )  # fmt: skip
    table.add_row(
        "disk: installation (runtime dependencies)", _mb(sum(install.values())), "", "", "-", "-"
    )
    table.add_row(
        f"disk: data directory after {demo.seconds:.0f} s of the demo agent",
        _mb(sum(demo.disk_after.values())), "", "", "-", "-",
    )  # fmt: skip
    table.add_row(
        "disk: data directory after a day (extrapolated)", _mb(demo.disk_day), "", "", "-", "-"
    )
    console.print(table)
    heaviest = sorted(install.items(), key=lambda kv: -kv[1])[:6]
    console.print(
        "installation, largest: " + ", ".join(f"{name} {_mb(size)}" for name, size in heaviest)
    )
    per_run = demo.database_growth / max(1, sum(demo.runs.values()))
    console.print(
        "data directory after the run: "
        + ", ".join(f"{part} {_mb(size)}" for part, size in demo.disk_after.items())
        + f"; grows {_mb(demo.growth_per_day)} a day extrapolated from {demo.seconds:.0f} s "
        f"(an estimate, not a measured day; runs are kept 30 days); over the run, "
        f"{per_run / 1024:.1f} KB of database a run ({_mb(per_run * 1440)} a day for an agent "
        "run once a minute), by table: "
        + ", ".join(
            f"{table} {_mb(demo.table_growth(table))}"
            for table in sorted(demo.tables_after, key=lambda t: -demo.table_growth(t))[:5]
        )
    )
    console.print(
        f"idle node: numpy {'loaded' if idle.numpy_loaded else 'not loaded'}, ONNX Runtime "
        f"{'loaded' if idle.ort_loaded else 'not loaded'}"
    )
    for agent in agents:
        memory = (
            "no memory" if agent.memory_notes is None else f"memory of {agent.memory_notes} notes"
        )
        console.print(
            f"demo node, {memory}: ONNX Runtime {'loaded' if agent.ort_loaded else 'NOT loaded'}, "
            f"tokenizers {'loaded' if agent.tokenizers_loaded else 'not loaded'}, "
            f"{agent.workers} worker processes, runs {dict(sorted(agent.runs.items()))}; "
            f"holds {_holders_line(agent)}"
        )
    console.print(f"start-ups: {', '.join(f'{s:.2f} s' for s in starts)}")
    for name, ok in goals.items():
        console.print(f"goal: {name} -> {verdict(ok)}")
    return all(goals.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("var/demo-models"))
    parser.add_argument(
        "--embedding-model", type=Path, default=EMBEDDING_MODEL,
        help="the demo agent's embedding model; the run with memory is skipped without it",
    )  # fmt: skip
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--agent-seconds", type=float, default=60.0)
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="edgeos-footprint-") as tmp:
        root = Path(tmp)
        with console.status("starting nodes"):
            starts = [time_to_ready(root / "restarts") for _ in range(args.starts)]
        with console.status(f"watching an idle node for {args.idle_seconds:g} s"):
            idle = measure_idle(root / "idle", args.idle_seconds)
        agents = []
        if args.embedding_model.exists():
            with console.status(f"running the demo agent with memory for {args.agent_seconds:g} s"):
                agents.append(
                    measure_agent(
                        args.models, root / "memory", args.agent_seconds,
                        embedding_model=args.embedding_model,
                    )
                )  # fmt: skip
        else:
            console.print(
                f"no embedding model at {args.embedding_model} (make embedding-model): "
                "the demo agent runs without memory"
            )
        with console.status(f"running the demo agent without memory for {args.agent_seconds:g} s"):
            agents.append(measure_agent(args.models, root / "agent", args.agent_seconds))
        install = installation_bytes()
    report(console, starts=starts, idle=idle, agents=agents, install=install)
    return 0


if __name__ == "__main__":
    sys.exit(main())
