"""The second half of ``edgeos demo``: a retail inventory agent working on a real node.

Everything runs on this machine, on loopback: a store database in SQLite fed one simulated
day per second by the retail simulator, whose point of sale exports a row per closed day;
a supplier HTTP service that takes reorders and customer messages once per
``Idempotency-Key`` (and loses some of its answers, so the node has to send again); the
node itself as a child process (``edgeos node run``) running the ``inventory`` agent
bundle; and a scripted operator answering the agent's questions over the node's API. The
demo shows progress while it runs, then stops everything cleanly and prints the agent's
KPIs, measured from the node's own records.

The agent asks for capabilities, not endpoints: its ``agent.yaml`` requires the
``supplier``, ``messaging`` and ``pos`` contracts shipped in ``demo/contracts``, and the
node's ``connectors.yaml`` binds each to a connector that implements it. Every effect
(``supplier.reorder``, ``messaging.send``) is checked against its contract when the agent
decides it and again before delivery, and every run starts from a ``pos.sales`` event the
``pos`` binding emits for each row of the export, checked against its contract too.

The agent has a long-term memory on the device: the demo gives it the store's supplier
notes and customer preferences (:mod:`edgeos.demo.knowledge`), embedded by
all-MiniLM-L6-v2 (``make embedding-model`` exports it), and the agent recalls them by
meaning when it sizes a reorder (the supplier really ships some SKUs short, as its notes
say) and remembers the reorders that were not enough. Without the exported model the demo
says so and the agent runs without memory.

With the demo fleet, the agent's stockout-risk calls are routed (``ctx.infer``): the demo
publishes the larger ``stockout-risk-xl`` to the fleet, whose cloud venue serves it over
mTLS, writes the node's ``venues.yaml`` (this device, and the fleet's cloud at a price per
call), and rolls out a fleet policy that lets the store's internal data go to the cloud.
Each call runs on the device first and goes to the cloud when the device's model is
unsure; the line per day and the summary say how many calls ran where (and how many
waited for an offline venue), what they cost, and the saving against sending all to the
cloud, read from the node's journal.

The agent's messages to customers are drafted on the device by the demo's language model
(``make genai-model`` trains it), held to a schema that keeps the recipient and the SKU
exact (:mod:`edgeos.demo.drafting`). Without the model (it needs PyTorch to build) the
demo says so and the messages are templates.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgeos.agents import manage, store
from edgeos.agents.kpis import AgentKPIs, agent_kpis
from edgeos.connectors.config import load_connectors
from edgeos.connectors.contracts import Contract, node_contracts
from edgeos.connectors.personal import PERSONAL, is_pseudonym
from edgeos.demo.drafting import DRAFTER, DRAFTER_ENV, DRAFTER_MODEL
from edgeos.demo.fleet import CLOUD_POLICY, DemoFleet, FleetView
from edgeos.demo.knowledge import FILL_RATES, NOTES
from edgeos.demo.operator import FleetDesk, ScriptedOperator
from edgeos.demo.store import (
    STORE_DB_ENV,
    StoreFeeder,
    StoreSimulator,
    connect,
    create_store,
    sales_export,
)
from edgeos.demo.supplier import SupplierService
from edgeos.demo.train import DemoModels, build_demo_models
from edgeos.manifests.agent import Memory as MemoryConfig
from edgeos.node.process import ServerProcess, node_process
from edgeos.routing.stats import AgentCosts, agent_costs
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.settings import load_settings
from edgeos.state import Database, journal
from edgeos.sync.identity import FleetPaths

AGENT = "inventory"
MODEL = "stockout-risk"
CLOUD_MODEL = "stockout-risk-xl"
"""The larger model the fleet's cloud venue serves for ``stockout-risk``."""
CLOUD_PRICE = 0.0004
"""What one call to the cloud venue costs (a hosted inference call of its size)."""
SALES = "pos.sales"
"""The event of the ``pos`` contract that starts the agent: a day's sales are closed."""
BUNDLE_DIR = Path(__file__).parent / "agents" / AGENT
"""The agent bundle shipped with edgeos (``agent.yaml`` and ``agent.py``)."""
CONTRACTS_DIR = Path(__file__).parent / "contracts"
"""The capability contracts the demo's bindings implement (``<capability>.yaml``)."""
EMBEDDING_MODEL = Path("var/embedding-models/all-minilm-l6-v2-int8.onnx")
"""Where ``make embedding-model`` exports the agent's embedding model (with its manifest):
all-MiniLM-L6-v2 in int8, a quarter of the fp32 model's memory (``bench/footprint.py``)."""

ACTIVE = ("pending", "running", "waiting_human")


@dataclass(frozen=True)
class InventoryDemoResult:
    """What one run of the inventory demo measured."""

    kpis: AgentKPIs
    runs: dict[str, int]
    """Runs of the agent by final state (``paused``: parked by the pause at the end)."""
    reviewed_days: int
    """Runs that reviewed a new simulated day (the others found nothing new)."""
    simulated_days: int
    operator_answers: int
    operator_overrides: int
    fleet_answers: int
    """Of the operator's answers, those given at the fleet (applied by the node)."""
    outbox: dict[str, dict[str, int]]
    """Effects by connector and delivery state (pending, delivered, dead)."""
    supplier: dict[str, int]
    """The supplier's own counts (``GET /stats``)."""
    order_requests: dict[str, int]
    """Requests the supplier received per applied order key (more than 1: a redelivery)."""
    enqueued_order_keys: frozenset[str]
    """Idempotency keys of every reorder the node's outbox holds."""
    store_deliveries: int
    """Reorders the store received before the simulation stopped."""
    outcomes: dict[str, int]
    """Earlier predictions scored by the agent's last review (resolved, correct, stockouts)."""
    training_examples: dict[str, int]
    """Feedback rows the agent left: predictions with their outcome, and people's corrections."""
    contracts: dict[str, str]
    """The contract each binding implements (``supplier``: ``supplier@1.0``)."""
    event_runs: int
    """Runs started by a ``pos.sales`` event (the agent has no other automatic trigger)."""
    pseudonymised: int
    """``messaging.send`` effects whose recipient the journal holds as a pseudonym."""
    drafted: int | None
    """Customer messages the language model drafted; None when it was not there (templates)."""
    memory: dict[str, int] | None
    """The agent's memory: ``notes`` given, ``learned`` by its runs, reorders ``raised`` by
    what it recalled; None when it ran without (no embedding model)."""
    personal_leaks: int
    """Journal records that hold a recipient in clear (expected none)."""
    fleet: FleetView | None
    """What the demo fleet's dashboard showed of the node at the end (None: no fleet)."""
    venues: AgentCosts | None
    """The agent's routed calls by venue, their cost and all-cloud's (None: none routed)."""
    deferred_calls: int
    """Routed calls that waited for an offline venue."""
    node_exit_code: int
    node_stopped_cleanly: bool
    """The node finished its graceful shutdown after SIGTERM."""
    leftovers: list[str] = field(default_factory=list)
    """Anything still running after clean-up (expected empty)."""
    rows: list[tuple[str, str]] = field(default_factory=list)
    """The summary table, as printed."""


def write_connectors(data_dir: Path, supplier_url: str, sales_csv: Path | None = None) -> list[str]:
    """Put the demo's contracts in the node and bind them: ``supplier.reorder`` and
    ``messaging.send`` to the supplier service, ``pos.sales`` to the point of sale's export.

    ``sales_csv`` defaults to ``sales.csv`` beside the data directory, where
    :func:`~edgeos.demo.store.sales_export` puts it for a store database there.
    """
    contracts = data_dir / "contracts"
    contracts.mkdir(parents=True, exist_ok=True)
    for contract in sorted(CONTRACTS_DIR.glob("*.yaml")):
        shutil.copyfile(contract, contracts / contract.name)
    http = {"type": "http", "base_url": supplier_url, "timeout_s": 5}
    bindings = {
        "supplier": {
            **http,
            "implements": {"capability": "supplier", "version": "1.0"},
            "operations": {"reorder": {"method": "POST", "path": "/orders"}},
        },
        "messaging": {
            **http,
            "implements": {"capability": "messaging", "version": "1.0"},
            "operations": {"send": {"method": "POST", "path": "/messages"}},
        },
        "pos": {
            "type": "files",
            "implements": {"capability": "pos", "version": "1.0"},
            # A day closes every second: look five times as often.
            "interval": "200ms",
            "watch": {"pos.sales": {"path": str(sales_csv or data_dir.parent / "sales.csv"),
                                    "csv": True}},
        },
    }  # fmt: skip
    (data_dir / "connectors.yaml").write_text(yaml.safe_dump(bindings, sort_keys=False))
    return list(bindings)


def write_venues(data_dir: Path, built: DemoModels) -> None:
    """The node's ``venues.yaml``: this device's model host, and the fleet's cloud venue
    serving the larger model under the agent's model name, at a price per call."""
    cloud = {
        MODEL: {"model": CLOUD_MODEL, "quality": round(built.metrics[CLOUD_MODEL].accuracy, 3)}
    }
    venues = {"venues": {
        "edge": {"type": "local"},
        "cloud": {"type": "fleet", "price_per_call": CLOUD_PRICE, "latency_ms": 40,
                  "models": cloud},
    }}  # fmt: skip
    (data_dir / "venues.yaml").write_text(yaml.safe_dump(venues, sort_keys=False))


def allow_cloud(console: Console, fleet: DemoFleet, data_dir: Path) -> bool:
    """Once the node enrolled, roll out the fleet policy that lets its internal data go to
    the cloud, and wait until the node has it; False if it did not arrive in time."""
    policy = FleetPaths.of(data_dir).policies / f"{CLOUD_POLICY}.yaml"
    with console.status("rolling out the fleet's venue policy to the node"):
        if not _wait(lambda: fleet.device_id() is not None, timeout=20.0, interval=0.2):
            return False
        device = fleet.device_id()
        assert device is not None  # it enrolled
        fleet.allow_cloud(device)
        return _wait(policy.exists, timeout=20.0, interval=0.1)


def bound_contracts(data_dir: Path) -> dict[str, Contract]:
    """The contract each binding in the node's ``connectors.yaml`` implements, by binding."""
    return node_contracts(data_dir, load_connectors(data_dir / "connectors.yaml"))


def install(
    data_dir: Path,
    model: Path,
    manifest: Path,
    connectors: list[str],
    embedding_model: Path | None = None,
) -> int:
    """Register the edge model and install the agent bundle in a node data directory,
    checking the agent's ``requires`` against the contracts its bindings implement.

    With ``embedding_model`` (an exported file beside its manifest), register it too and
    give the agent its notes; returns how many it remembered (0 without the model).
    """
    settings = load_settings({"data_dir": data_dir})
    with Database(settings.database_path) as db:
        registry = ModelRegistry(db, settings.model_store)
        registry.add(model, name=MODEL, version="1", manifest=manifest)
        agent = manage.add_agent(
            db, BUNDLE_DIR, data_dir / "agents", models=[MODEL], connectors=connectors,
            contracts=bound_contracts(data_dir),
        )  # fmt: skip
        if embedding_model is None:
            return 0
        registry.add(embedding_model, manifest=embedding_model.with_suffix(".yaml"))
        return remember_notes(db, ModelHost(registry), agent.manifest.memory)


def install_drafter(data_dir: Path, model: Path) -> None:
    """Register the exported language model that drafts the agent's customer messages."""
    from edgeos.runtime.genai_store import register_generative

    settings = load_settings({"data_dir": data_dir})
    with Database(settings.database_path) as db:
        register_generative(ModelRegistry(db, settings.model_store), model, name=DRAFTER)


def remember_notes(db: Database, host: ModelHost, config: MemoryConfig) -> int:
    """Give the agent the store's supplier notes and customer preferences; how many."""
    from edgeos.memory.handle import AgentMemory

    try:
        memory = AgentMemory(db, host, AGENT, config)
        for note in NOTES:
            memory.remember(note.text, note.metadata, subject=note.subject, importance=0.8)
        return len(memory.commit().remembered)
    finally:
        host.close()


def run_inventory_demo(
    models_dir: Path,
    *,
    duration: float = 20.0,
    console: Console,
    seed: int = 3,
    start_day: int = 290,
    skus: int = 12,
    tick_seconds: float = 1.0,
    drop_reply_rate: float = 0.1,
    override_rate: float = 0.25,
    embedding_model: Path = EMBEDDING_MODEL,
    drafter: Path = DRAFTER_MODEL,
    fleet: DemoFleet | None = None,
) -> InventoryDemoResult:
    """Run the inventory agent for ``duration`` seconds of simulated trading, then report.

    ``seed`` drives the simulated store, the supplier's lost answers and the operator's
    overrides; the agent's runs follow wall-clock time, so two runs differ in detail.
    The store opens on ``start_day`` of its year (the default is the run-up to Halloween,
    when shelves run low), after a simulated history up to that day. The agent remembers
    and recalls with ``embedding_model`` when that file exists, and runs without memory
    when it does not; it drafts customer messages with the language model exported in
    ``drafter`` when that directory holds one, and sends templates when not. With ``fleet`` (started), the node joins it and sends its telemetry
    there, and the summary says what its dashboard showed.
    """
    if duration <= 0:
        raise ValueError("duration must be positive")
    console.rule("[bold]edgeos demo: a retail inventory agent on this node")
    with console.status("checking the demo models"):
        built = build_demo_models(models_dir)
    root = Path(tempfile.mkdtemp(prefix="edgeos-inventory-"))
    data_dir, store_db = root / "node", root / "store.db"
    simulator = StoreSimulator(1, skus, seed=seed)
    simulator.fast_forward(start_day)
    try:
        with contextlib.ExitStack() as stack:
            supplier = stack.enter_context(
                SupplierService(drop_reply_rate=drop_reply_rate, seed=seed, fill_rates=FILL_RATES)
            )
            feeder = StoreFeeder(
                store_db, simulator, tick_seconds=tick_seconds, shipments=supplier.take_shipments
            )
            create_store(store_db, feeder.lanes, seed=seed)
            connectors = write_connectors(data_dir, supplier.url, sales_export(store_db))
            has_memory = embedding_model.exists()
            with console.status("installing the agent" + (" and its memory" * has_memory)):
                notes = install(
                    data_dir, built.models[MODEL], built.manifests[MODEL], connectors,
                    embedding_model if has_memory else None,
                )  # fmt: skip
            console.print(_memory_line(notes, embedding_model))
            drafting = (drafter / "genai_config.json").exists()
            if drafting:
                with console.status("registering the drafting model"):
                    install_drafter(data_dir, drafter)
            console.print(_drafting_line(drafting))
            console.print(
                f"store: {skus} SKUs from day {start_day} of the year, one simulated day every "
                f"{tick_seconds:g} s; supplier "
                f"at {supplier.url} (loses {drop_reply_rate:.0%} of its answers)"
            )
            console.print(_contracts_line(bound_contracts(data_dir)))
            node = node_process(data_dir)
            # The agent's scheduled runs have no input: the node tells them where the store is.
            node.env = {**(node.env or {}), STORE_DB_ENV: str(store_db)}
            if drafting:
                node.env[DRAFTER_ENV] = DRAFTER
            if fleet is not None:
                node.env.update(fleet.node_env(fleet.join_token()))
                node.command += ["--fleet", fleet.url]
                with console.status("publishing the cloud model to the fleet"):
                    fleet.serve_model(
                        CLOUD_MODEL, built.models[CLOUD_MODEL], built.manifests[CLOUD_MODEL]
                    )
                write_venues(data_dir, built)
            with console.status("starting the node"):
                stack.enter_context(node)
            console.print(
                f"node running at [bold]{node.url}[/] with agent [bold]{AGENT}[/] "
                "(sense -> reason -> act -> learn, on each pos.sales event)"
            )
            if fleet is not None:
                console.print(
                    f"the node joins the demo fleet: its runs, traces, KPIs and questions "
                    f"on the dashboard at {fleet.dashboard}", highlight=False,
                )  # fmt: skip
                if allow_cloud(console, fleet, data_dir):
                    console.print(
                        f"venues: {MODEL} runs on this device; when it is less than 80% sure, "
                        f"the fleet's cloud venue runs {CLOUD_MODEL} ({CLOUD_PRICE:g} a call)"
                    )
                else:
                    console.print("[red]the fleet's venue policy did not reach the node: "
                                  "every call stays on the device[/]")  # fmt: skip
            db = stack.enter_context(Database(data_dir / "node.db"))
            feeder.start()
            stack.callback(feeder.stop)
            desk = None
            if fleet is not None:
                desk = FleetDesk(fleet.url, fleet.admin_token, fleet.device_id)
            operator = ScriptedOperator(node.url, override_rate=override_rate, seed=seed,
                                        fleet=desk, token=node.token)  # fmt: skip
            stack.enter_context(operator)

            news = _News(db, operator)
            _watch(console, news, feeder, supplier, duration)
            parked, exit_code, seen = _wind_down(console, news, feeder, node, fleet)
            result = _collect(
                db, feeder, supplier, operator, store_db, exit_code,
                clean=stopped_cleanly(node), parked=parked, notes=notes if has_memory else None,
                fleet=seen, drafting=drafting,
            )  # fmt: skip
        result.leftovers.extend(_leftovers(node, supplier, feeder, operator))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _report(console, result)
    return result


# -- while it runs ----------------------------------------------------------------------
class _News:
    """What happened since the last look: the operator's answers and finished reviews."""

    def __init__(self, db: Database, operator: ScriptedOperator) -> None:
        self.db = db
        self.operator = operator
        self.seen_runs: set[str] = set()
        self.shown_answers = 0

    def show(self, console: Console) -> None:
        """Print a line per new answer and per run that reviewed a day."""
        answers = self.operator.answers[self.shown_answers :]
        self.shown_answers += len(answers)
        for answer in answers:
            verdict = "[yellow](overrides the model)[/]" if answer.override else "(agrees)"
            who = "operator at the fleet" if answer.via_fleet else "operator"
            console.print(f"  {who}: {answer.question} [bold]{answer.choice}[/] {verdict}")
        venues = ""
        for run in reversed(store.runs(self.db, agent=AGENT, state="succeeded", limit=50)):
            if run.id in self.seen_runs:
                continue
            self.seen_runs.add(run.id)
            out = run.outcome if isinstance(run.outcome, dict) else {}
            if not out.get("reviewed"):
                continue
            at_risk = " ".join(out["at_risk"]) or "none"
            asked = f", {out['escalated']} asked" if out["escalated"] else ""
            if out.get("raised"):
                asked += f", {_count(out['raised'], 'reorder')} raised by memory"
            took = (run.finished_at or run.created_at) - run.created_at
            venues = venues or venue_decisions(*_routed(self.db), brief=True)
            console.print(
                f"day {out['day']}: {out['decisions']} SKUs, {took * 1000:.0f} ms{asked} | "
                f"at risk: {at_risk} | {_count(out['reorders'], 'reorder')}, "
                f"{_count(out['messages'], 'message')} | venues so far: {venues}"
            )


def _routed(db: Database) -> tuple[AgentCosts | None, int]:
    """The agent's routed calls so far (None: none yet), and how many were deferred."""
    costs = agent_costs(db, AGENT)
    row = db.reader().execute("SELECT count(*) FROM deferred_tasks WHERE agent = ?", (AGENT,))
    return (costs[0] if costs else None), int(row.fetchone()[0])


def venue_decisions(costs: AgentCosts | None, deferred: int, *, brief: bool = False) -> str:
    """Where the agent's model calls ran, what they cost, and the saving against all-cloud
    (``brief``: the saving alone, for a line per day)."""
    if costs is None:
        return f"none routed, {deferred} deferred"
    edge, cloud = (costs.by_venue.get(v, (0, 0.0))[0] for v in ("edge", "cloud"))
    counts = f"{edge} edge, {cloud} cloud, {deferred} deferred"
    if brief:
        return f"{counts}, saved {costs.saving:.4f}"
    return (
        f"{counts}; cost {costs.cost:.4f}, saved {costs.saving:.4f} against all-cloud "
        f"({costs.all_cloud_cost:.4f})"
    )


def _watch(
    console: Console,
    news: _News,
    feeder: StoreFeeder,
    supplier: SupplierService,
    duration: float,
) -> None:
    """Show progress for ``duration`` seconds, with a line per reviewed day and per answer."""
    columns = (
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
        TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("trading", total=duration, status="")
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < duration:
            if feeder.error is not None:
                raise RuntimeError(f"the store feeder stopped: {feeder.error}") from feeder.error
            news.show(progress.console)
            stats = supplier.snapshot()
            counts = store.state_counts(news.db, AGENT)
            progress.update(
                task,
                completed=min(elapsed, duration),
                status=(
                    f"day {feeder.day} | {counts.get('succeeded', 0)} runs done | "
                    f"{news.operator.answered} answered | {stats['orders']} reorders | "
                    f"{stats['messages']} messages"
                ),
            )
            time.sleep(0.2)
        news.show(progress.console)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# -- stopping ---------------------------------------------------------------------------
def _wait(check: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def _active(db: Database, states: tuple[str, ...] = ACTIVE) -> int:
    counts = store.state_counts(db, AGENT)
    return sum(counts.get(s, 0) for s in states)


def _event_runs(db: Database) -> int:
    row = (
        db.reader()
        .execute(
            "SELECT count(*) FROM runs WHERE agent = ? AND trigger = ?", (AGENT, f"event:{SALES}")
        )
        .fetchone()
    )
    return int(row[0])


def _pending_effects(db: Database) -> int:
    row = db.reader().execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()
    return int(row[0])


def _wind_down(
    console: Console, news: _News, feeder: StoreFeeder, node: ServerProcess,
    fleet: DemoFleet | None = None,
) -> tuple[int, int, FleetView | None]:  # fmt: skip
    """Stop the store, let runs in flight finish, pause the agent, drain, let the fleet
    catch up (when there is one), stop the node.

    Returns (runs parked by the pause, the node's exit code, what the fleet's dashboard
    showed). Pausing parks a run at its next step rather than finishing it, so the agent
    is paused only at a moment when no run is in flight: triggers fire once a second and
    an idle run lasts milliseconds.
    """
    db = news.db
    with console.status("letting runs in flight finish"):
        feeder.stop()
        # The last rows of the export become events at the source's next look.
        _wait(lambda: _event_runs(db) >= feeder.days, timeout=5.0)
        # Questions still open are answered by the operator (or time out by themselves).
        _wait(lambda: _active(db) == 0, timeout=15.0)
        manage.set_paused(db, AGENT, True)
        _wait(lambda: _active(db, ("pending", "running")) == 0, timeout=10.0)
        _wait(lambda: _pending_effects(db) == 0, timeout=15.0)
        news.operator.stop()
        news.show(console)  # the runs that finished meanwhile
    seen = None if fleet is None else _fleet_catch_up(console, fleet, db)
    with console.status("stopping the node (SIGTERM)"):
        exit_code = node.stop()
    parked = _active(db, ("paused", "waiting_human"))
    clean = stopped_cleanly(node)
    verb = "stopped cleanly" if clean else f"[red]exited with {exit_code}[/]"
    console.print(f"store closed, agent paused, node {verb} on SIGTERM")
    if not clean:
        console.print(node.log()[-4000:], markup=False, highlight=False)
    return parked, exit_code, seen


def _fleet_catch_up(console: Console, fleet: DemoFleet, db: Database) -> FleetView | None:
    """Wait until the fleet has every finished run and the first KPIs, then look at the
    dashboard. KPIs travel per closed minute: the wait ends a little after the minute
    in which the first run finished closes (at most about a minute), and the dashboard
    is up meanwhile."""
    finished, count = (
        db.reader()
        .execute("SELECT min(finished_at), count(*) FROM runs WHERE agent = ? AND finished_at "
                 "IS NOT NULL", (AGENT,))
        .fetchone()
    )  # fmt: skip
    # The minute closes, the uplink collects it (every 2 s) and sends it (every second).
    deadline = time.time() + 20.0 if finished is None else (finished // 60 + 1) * 60 + 20.0
    device: list[str] = []

    def arrived() -> bool:
        if not device:
            found = fleet.device_id()
            if found is None:
                return False
            device.append(found)
        kpi_runs, _ = fleet.kpis_of(device[0])
        return kpi_runs > 0 and fleet.runs_reported(device[0]) >= min(count, 1000)

    wait = max(deadline - time.time(), 0.0)
    with console.status(
        f"waiting for the node's KPIs to reach the fleet (sent per closed minute; the dashboard "
        f"is up at {fleet.dashboard})"
    ):
        _wait(arrived, timeout=wait, interval=0.5)
    if not device:
        console.print("[red]the node did not enroll in the demo fleet[/]")
        return None
    return fleet.look(device[0])


def stopped_cleanly(node: ServerProcess) -> bool:
    """The node ran its shutdown to the end after SIGTERM.

    Uvicorn re-raises the signal once its graceful shutdown is done, so a clean stop
    exits with -SIGTERM as well as 0; the node's last log line tells them from a kill.
    """
    return node.returncode in (0, -signal.SIGTERM) and "node stopped" in node.log()


def _leftovers(
    node: ServerProcess,
    supplier: SupplierService,
    feeder: StoreFeeder,
    operator: ScriptedOperator,
) -> list[str]:
    """What is still running after clean-up (nothing, when all went well)."""
    left = []
    if node.returncode == -1:
        left.append("node process")
    if supplier.running:
        left.append("supplier service")
    else:
        with contextlib.suppress(httpx.TransportError), httpx.Client(timeout=0.5) as client:
            client.get(f"{supplier.url}/stats")
            left.append("supplier socket")
    if feeder.running:
        left.append("store feeder")
    if operator.running:
        left.append("operator")
    return left


# -- the report -------------------------------------------------------------------------
def _collect(
    db: Database,
    feeder: StoreFeeder,
    supplier: SupplierService,
    operator: ScriptedOperator,
    store_db: Path,
    exit_code: int,
    *,
    clean: bool,
    parked: int,
    notes: int | None,
    fleet: FleetView | None = None,
    drafting: bool = False,
) -> InventoryDemoResult:
    conn = db.reader()
    outbox: dict[str, dict[str, int]] = {}
    for connector, state, n in conn.execute(
        "SELECT connector, state, count(*) FROM outbox GROUP BY connector, state"
    ):
        outbox.setdefault(connector, {"pending": 0, "delivered": 0, "dead": 0})[state] = int(n)
    order_keys = frozenset(
        k for (k,) in conn.execute("SELECT key FROM outbox WHERE connector = 'supplier'")
    )
    finished = store.runs(db, agent=AGENT, state="succeeded", limit=100_000)
    reviewed = [r for r in finished if isinstance(r.outcome, dict) and r.outcome.get("reviewed")]
    outcomes: dict[str, Any] = reviewed[0].outcome["outcomes"] if reviewed else {}
    with contextlib.closing(connect(store_db)) as store_conn:
        deliveries = int(store_conn.execute("SELECT count(*) FROM deliveries").fetchone()[0])
    leaks, pseudonymised = _personal_in_journal(conn)
    routed, deferred = _routed(db)
    with_outcome, corrections = conn.execute(
        "SELECT coalesce(sum(outcome IS NOT NULL AND outcome != 'null'), 0), "
        "coalesce(sum(correction IS NOT NULL), 0) FROM feedback WHERE agent = ?",
        (AGENT,),
    ).fetchone()
    result = InventoryDemoResult(
        kpis=agent_kpis(db, AGENT),
        runs=store.state_counts(db, AGENT),
        reviewed_days=len(reviewed),
        simulated_days=feeder.days,
        operator_answers=operator.answered,
        operator_overrides=operator.overrides,
        fleet_answers=operator.via_fleet,
        outbox=outbox,
        supplier=supplier.snapshot(),
        order_requests=supplier.keys("order"),
        enqueued_order_keys=order_keys,
        store_deliveries=deliveries,
        outcomes={k: int(v) for k, v in outcomes.items()},
        training_examples={"outcomes": int(with_outcome), "corrections": int(corrections)},
        contracts={b: c.label for b, c in bound_contracts(db.path.parent).items()},
        event_runs=_event_runs(db),
        pseudonymised=pseudonymised,
        drafted=sum(int(r.outcome.get("drafted", 0)) for r in reviewed) if drafting else None,
        memory=None
        if notes is None
        else {
            "notes": notes,
            "learned": sum(int(r.outcome.get("learned", 0)) for r in reviewed),
            "raised": sum(int(r.outcome.get("raised", 0)) for r in reviewed),
        },
        personal_leaks=leaks,
        fleet=fleet,
        venues=routed,
        deferred_calls=deferred,
        node_exit_code=exit_code,
        node_stopped_cleanly=clean,
    )
    result.rows.extend(_rows(result, parked))
    return result


def _personal_in_journal(conn: Any) -> tuple[int, int]:
    """(journal records holding a message's recipient in clear, messages journaled with a
    pseudonym for it): the recipient is personal in the messaging contract."""
    sent = conn.execute("SELECT payload FROM outbox WHERE connector = 'messaging'")
    recipients = {orjson.loads(text)["to"] for (text,) in sent}
    leaks = pseudonymised = 0
    for kind, stored in conn.execute("SELECT kind, payload FROM journal"):
        text = journal.payload_bytes(stored, conn).decode()
        leaks += any(to in text for to in recipients)
        record = orjson.loads(text)
        if kind == "effect_enqueued" and record["connector"] == "messaging":
            pseudonymised += is_pseudonym(record["payload"]["to"])
    return leaks, pseudonymised


def _memory_line(notes: int, model: Path) -> str:
    if not notes:
        return (
            f"agent memory: off (no embedding model at {model}; `make embedding-model` "
            "exports all-MiniLM-L6-v2): reorders follow the stockout model alone"
        )
    return (
        f"agent memory: {notes} supplier notes and customer preferences, embedded on this "
        "device by all-MiniLM-L6-v2 and recalled by meaning when a reorder is sized"
    )


def _drafting_line(drafting: bool) -> str:
    if not drafting:
        return "customer messages: templates; `make genai-model` builds the drafting model"
    return (
        f"customer messages: drafted on this device by {DRAFTER}, held to a schema that keeps "
        "the recipient and the SKU exact"
    )


def _contracts_line(bound: dict[str, Contract]) -> str:
    """What the bindings implement, as one line: capabilities, not endpoints."""
    parts = []
    for contract in bound.values():
        names = [*contract.operations, *(f"event {e}" for e in contract.event_names)]
        personal = [
            field
            for op in contract.operations.values()
            for field, schema in op.input.get("properties", {}).items()
            if isinstance(schema, dict) and schema.get(PERSONAL) is True
        ]
        note = "".join(f"; {field} is personal" for field in personal)
        parts.append(f"{contract.label} ({', '.join(names)}{note})")
    return f"contracts: {', '.join(parts)}; every effect and event is checked against them"


def _rows(r: InventoryDemoResult, parked: int) -> list[tuple[str, str]]:
    k = r.kpis
    supplier_box = r.outbox.get("supplier", {})
    messaging_box = r.outbox.get("messaging", {})
    redelivered = sum(n - 1 for n in r.order_requests.values())
    s = r.supplier
    resolved = r.outcomes.get("resolved", 0)
    outcome_text = (
        "none resolved yet"
        if not resolved
        else f"{r.outcomes['correct']}/{resolved} right ({r.outcomes['correct'] / resolved:.0%}); "
        f"{r.outcomes['stockouts']} ran out"
    )
    rows = list(k.rows())
    idle = k.succeeded - r.reviewed_days
    if idle:
        rows.append(("runs that found no new day", str(idle)))
    if parked:
        rows.append(("runs parked by the pause", str(parked)))
    recipients = (
        f"{r.personal_leaks} records hold one in clear"
        if r.personal_leaks
        else f"as pseudonyms ({r.pseudonymised}), none in clear"
    )
    fleet = []
    fleet_answers = f"; {r.fleet_answers} at the fleet" if r.fleet is not None else ""
    if r.fleet is not None:
        f = r.fleet
        fleet.append(("on the fleet's dashboard", f"device {f.device_id[:13]}: {f.runs_listed} "
                      f"latest runs listed, {f.kpi_runs} runs in its KPIs, "
                      f"{f.telemetry_records} telemetry records, {f.escalations} questions "
                      "seen"))  # fmt: skip
    unreviewed = r.simulated_days - r.reviewed_days
    late = f", {unreviewed} closed too late to review" if unreviewed else ""
    return [
        *rows,
        ("simulated days", f"{r.simulated_days} ({r.reviewed_days} reviewed{late})"),
        ("questions answered by the operator", f"{r.operator_answers} ({r.operator_overrides} "
                                               f"overrides{fleet_answers})"),
        ("reorders delivered", f"{supplier_box.get('delivered', 0)} of {len(r.enqueued_order_keys)} "
                               f"decided; {s['orders']} applied by the supplier, "
                               f"{r.store_deliveries} received by the store"),
        ("redeliveries deduplicated", f"{s['replays']} replayed by key ({s['dropped_replies']} "
                                      f"answers lost on purpose, {redelivered} order resends)"),
        ("customer messages delivered", f"{messaging_box.get('delivered', 0)}; "
                                        f"{s['messages']} sent by the supplier; "
                                        + ("templates" if r.drafted is None else
                                           f"{r.drafted} drafted by {DRAFTER}")),
        ("effects dead", str(supplier_box.get("dead", 0) + messaging_box.get("dead", 0))),
        ("runs started by pos.sales events", f"{r.event_runs}, each checked against "
                                             f"{r.contracts.get('pos', 'no contract')}"),
        ("message recipients in the journal", recipients),
        ("earlier predictions scored", outcome_text),
        ("training examples recorded", f"{r.training_examples['outcomes']} outcomes, "
                                       f"{r.training_examples['corrections']} people's answers"),
        ("agent memory", "off (no embedding model)" if r.memory is None else
                         f"{r.memory['notes']} notes given, {r.memory['learned']} reorder "
                         f"outcomes learned; {r.memory['raised']} reorders raised by recall"),
        ("venue decisions", venue_decisions(r.venues, r.deferred_calls)),
        *fleet,
    ]  # fmt: skip


def _report(console: Console, result: InventoryDemoResult) -> None:
    table = Table("measure", "value", title=f"Agent '{AGENT}': measured on this run")
    for label, value in result.rows:
        table.add_row(label, value)
    console.print(table)
    if result.leftovers:
        console.print(f"[red]still running after clean-up: {', '.join(result.leftovers)}[/]")
    else:
        console.print("everything stopped and removed: node, supplier, store feeder, operator")
