"""Routing: the edgeos venue decision against all-edge, all-cloud and a difficulty-only cascade.

    python bench/routing.py [--models var/demo-models] [--tasks 10000] [--wan-ms 40]
                            [--down-every 2000 --down-for 200] [--rate 250]
                            [--arrivals poisson|fixed] [--workers N] [--connections 64]

The demo's stockout models as an edge/cloud pair: the small model on the device's own
host, the xl model on a real fleet's cloud venue (a fleet process on loopback, reached
over mTLS with an enrolled device's certificate), every cloud call held back by a
simulated WAN delay (``--wan-ms``, each way together) and priced per call. One stream of
tasks, drawn from the held-out evaluation rows, each with a privacy class (local-only,
restricted, internal, public) and a latency SLO (none, a loose one, or one only the edge
can meet), is run four ways in the same process, one after the other. The stream is
open-loop, as a device serving requests sees it: tasks arrive at ``--rate`` per second
(Poisson arrivals by default, the same arrival times for every strategy) whether or not
earlier ones are done. A task's latency runs from its arrival to its answer, so SLO
attainment includes queueing.

The device is bounded where its resources are, each held only while used, the same for
every strategy. Edge inference is CPU work: it takes one of ``--workers`` workers (by
default the host's inference threads, one per core) for as long as the model runs. A
cloud call is network I/O: it takes one of ``--connections`` connections (64 by default,
the V2 venue client's connection pool) for its round trip, WAN delay included, and no
worker; the link monitor's probes take a connection too. A task waiting for either holds
nothing else: every arrival gets a thread of its own at once (of 1,024 started before the
stream; the run says when a strategy had more tasks in flight), as an asynchronous
server takes every request, so a task the edge can answer never waits behind calls
stalled on the cloud. (Agents are bounded further: a step holds one of the agent
executor's threads through its cloud calls; see docs/routing.md.) The answer is timed
on the task's thread, when the strategy hands it back.

The link drops for stretches: the tasks arriving in the last ``--down-for`` of every
``--down-every`` find the cloud unreachable (connection refused at once), the same tasks
for every strategy, and the link monitor's probes see the link as the latest arrival
does.

- **all-edge**: every task on the small model;
- **all-cloud**: every task on the xl model in the cloud;
- **cascade**: RouteLLM/AutoMix style, difficulty alone: the edge first, the cloud when
  the edge's confidence is under the threshold, whatever the data's privacy or the SLO
  (the edge answer stands when the cloud cannot be reached);
- **edgeos**: ``Router.route`` with the task's needs, under a fleet policy that keeps
  restricted data on the edge (cascade mode with the same threshold), its link monitor
  probing the cloud every 200 ms; an escalation gets only what is left of its task's SLO
  counted from the task's arrival (the edge answer stands past it).

Side by side: accuracy, p50/p99 end-to-end latency, cost per decision and the saving
against all-cloud, SLO attainment, tasks that got no answer, and how many local-only
tasks each sent to the cloud; and the edgeos decision's own overhead (``Router.plan``,
nothing called).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from edgeos.demo.train import INPUT_NAME, DemoModels, build_demo_models
from edgeos.errors import UnavailableError
from edgeos.fleet.client import FleetClient
from edgeos.fleet.keystore import init_fleet
from edgeos.fleet.packing import pack_directory
from edgeos.fleet.settings import FleetConfig
from edgeos.manifests.policy import PolicyManifest
from edgeos.node.process import ServerProcess, free_port
from edgeos.routing.build import FLEET_VENUE_PATH
from edgeos.routing.decide import Needs
from edgeos.routing.monitor import LinkMonitor
from edgeos.routing.router import Router, confidence
from edgeos.routing.v2_venue import MAX_CONNECTIONS, ClientCertificate, V2Venue
from edgeos.routing.venues import LocalVenue, Offer, RoutingError, Venue, VenueAnswer, VenueInfo
from edgeos.runtime import HostConfig, ModelHost, ModelRegistry
from edgeos.state import Database
from edgeos.sync.enroll import enroll
from edgeos.sync.identity import FleetPaths
from edgeos.sync.inventory import collect_inventory

SMALL, XL = "stockout-risk", "stockout-risk-xl"
PRICE = 0.0004
#: Share of tasks by privacy class, and the SLOs drawn (None: no SLO; the tight one is
#: under the WAN delay, so only the edge can meet it).
PRIVACY_MIX = {"local-only": 0.15, "restricted": 0.10, "internal": 0.45, "public": 0.30}
SLO_MIX: dict[float | None, float] = {None: 0.4, 250.0: 0.4, 20.0: 0.2}
#: Threads the tasks run on, started before the stream: past them, a task waits for one
#: (the run says so).
TASK_THREADS = 1024


@dataclass(frozen=True)
class Task:
    """One call: an evaluation row, its true label, and what the task needs."""

    row: int
    label: int
    privacy: str
    slo_ms: float | None


@dataclass
class Outcome:
    """What one strategy did with one task."""

    correct: bool
    latency_ms: float
    cost: float
    to_cloud: bool
    #: No answer: the only venue the strategy would use was unreachable.
    failed: bool = False
    #: An escalation given up on when the task's SLO ran out (the edge answer stood).
    late: bool = False


#: Whether the link is down for the task whose call runs in this context (None: no task,
#: as for the link monitor's probes, which see :attr:`WanVenue.down`).
TASK_LINK_DOWN: ContextVar[bool | None] = ContextVar("task_link_down", default=None)


class DeviceVenue(LocalVenue):
    """The device's host, its inference bounded by ``workers``: a call past them waits."""

    def __init__(self, host: ModelHost, info: VenueInfo, workers: int) -> None:
        super().__init__(host, info)
        self.workers = threading.Semaphore(workers)

    def infer(self, model: str, inputs: Mapping[str, Any]) -> VenueAnswer:
        """Run the model on the host once a worker is free."""
        with self.workers:
            return super().infer(model, inputs)


class WanVenue:
    """A cloud venue behind a simulated WAN: every call and probe takes one of
    ``connections`` and waits ``delay_s`` on it first; while the link is down, each is
    refused at once, as a lost link refuses connections.

    A task's calls see the link as it was when the task arrived (:data:`TASK_LINK_DOWN`);
    probes see it as the latest arrival did (``down``)."""

    def __init__(self, venue: V2Venue, delay_s: float, connections: int) -> None:
        self.venue = venue
        self.info = venue.info
        self.delay_s = delay_s
        self.connections = threading.Semaphore(connections)
        self.down = False

    def _refused(self) -> None:
        down = TASK_LINK_DOWN.get()
        if self.down if down is None else down:
            raise UnavailableError(f"venue {self.info.name}: the WAN link is down")

    def offer(self, model: str) -> Offer | None:
        """As the venue behind it."""
        return self.venue.offer(model)

    def infer(self, model: str, inputs: Mapping[str, Any]) -> VenueAnswer:
        """The venue's answer, a WAN round trip later."""
        self._refused()
        with self.connections:
            time.sleep(self.delay_s)
            return self.venue.infer(model, inputs)

    def probe(self) -> None:
        """The venue's health, a WAN round trip later."""
        self._refused()
        with self.connections:
            time.sleep(self.delay_s)
            self.venue.probe()

    def close(self) -> None:
        """Close the venue's connections."""
        self.venue.close()


def workload(labels: np.ndarray, tasks: int, seed: int) -> list[Task]:
    """``tasks`` calls over the evaluation rows, privacy classes and SLOs drawn by the mixes."""
    rng = random.Random(seed)
    privacies, slos = list(PRIVACY_MIX), list(SLO_MIX)
    out = []
    for _ in range(tasks):
        row = rng.randrange(len(labels))
        privacy = rng.choices(privacies, weights=list(PRIVACY_MIX.values()))[0]
        slo = rng.choices(slos, weights=list(SLO_MIX.values()))[0]
        out.append(Task(row, int(labels[row]), privacy, slo))
    return out


@contextmanager
def cloud_venue(root: Path, demo: DemoModels, wan_s: float, connections: int) -> Iterator[WanVenue]:
    """A fleet process serving the xl model as its cloud venue, and an enrolled device's
    venue client for it (mTLS with the device certificate), behind the WAN delay."""
    config = FleetConfig(data_dir=root / "fleet")
    report = init_fleet(config)
    assert report.admin_token is not None
    ca_pem = (config.keys_dir / "ca.crt").read_text()
    url = f"https://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "edgeos", "fleet", "serve", "--data", str(config.data_dir),
               "--port", url.rsplit(":", 1)[1], "--log-level", "warning"]  # fmt: skip
    verify = ssl.create_default_context(cadata=ca_pem)
    with (
        ServerProcess(command, url, ready_path="/api/v1/ca", verify=verify),
        FleetClient(url, report.admin_token, ca_pem) as admin,
    ):
        artifact = root / "xl-artifact"
        artifact.mkdir()
        (artifact / "model.onnx").write_bytes(demo.models[XL].read_bytes())
        (artifact / "model.yaml").write_text(f"name: {XL}\nversion: '1'\ntask: classification\n")
        admin.publish("model", XL, "1", pack_directory(artifact))
        token = str(admin.create_join_token("bench")["token"])
        device = root / "device"
        enroll(device, url, token, collect_inventory())
        paths = FleetPaths.of(device)
        quality = demo.metrics[XL].accuracy
        info = VenueInfo("cloud", on_device=False, price_per_call=PRICE,
                         latency_ms=wan_s * 1000, models={SMALL: Offer(XL, quality)})  # fmt: skip
        venue = V2Venue(info, url + FLEET_VENUE_PATH,
                        certificate=ClientCertificate(paths.ca, paths.cert, paths.key))  # fmt: skip
        try:
            yield WanVenue(venue, wan_s, connections)
        finally:
            venue.close()


@dataclass(frozen=True)
class Drops:
    """The link's outages, by task: the last ``length`` of every ``every`` tasks."""

    every: int
    length: int

    def down(self, index: int) -> bool:
        """Whether the link is down for task ``index``."""
        return self.length > 0 and index % self.every >= self.every - self.length


def arrivals(tasks: int, rate: float, poisson: bool, seed: int) -> list[float]:
    """Each task's arrival (seconds from the start): ``rate`` per second, with exponential
    gaps (a Poisson process) or fixed ones."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for _ in range(tasks):
        out.append(at)
        at += rng.expovariate(rate) if poisson else 1 / rate
    return out


def run_strategy(
    tasks: list[Task],
    rows: np.ndarray,
    call: Callable[[Task, dict[str, Any], float], Outcome],
    cloud: WanVenue,
    drops: Drops,
    arrive: list[float],
) -> tuple[list[Outcome], int]:
    """Run the stream through ``call``: each task arrives at its time and runs at once on
    a thread of its own (the venues bound the work), timed from its arrival to the answer
    in hand. Also returns the most tasks in flight at once."""

    def on_thread(index: int, task: Task, arrived: float) -> Outcome:
        token = TASK_LINK_DOWN.set(drops.down(index))
        try:
            outcome = call(task, {INPUT_NAME: rows[task.row : task.row + 1]}, arrived)
        finally:
            TASK_LINK_DOWN.reset(token)
        outcome.latency_ms = (time.perf_counter() - arrived) * 1000
        return outcome

    async def stream(pool: ThreadPoolExecutor) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        begun = time.perf_counter()
        running = []
        for index, (task, at) in enumerate(zip(tasks, arrive, strict=True)):
            arrived = begun + at
            if arrived > time.perf_counter():
                await asyncio.sleep(arrived - time.perf_counter())
            cloud.down = drops.down(index)
            # Timed from when it was due: a driver that falls behind counts against us.
            running.append(loop.run_in_executor(pool, on_thread, index, task, arrived))
        outcomes = list(await asyncio.gather(*running))
        cloud.down = False
        return outcomes

    threads = min(len(tasks), TASK_THREADS)
    with ThreadPoolExecutor(threads, thread_name_prefix="task") as pool:
        # Every thread started before the stream: starting one while it runs would stall
        # the driver, and every arrival after it.
        ready = threading.Barrier(threads)
        list(pool.map(lambda _: ready.wait(), range(threads)))
        outcomes = asyncio.run(stream(pool))
    return outcomes, peak_in_flight(arrive, outcomes)


def peak_in_flight(arrive: list[float], outcomes: list[Outcome]) -> int:
    """The most tasks arrived and not yet answered at any one time."""
    events = sorted(
        [(at, 1) for at in arrive]
        + [(at + o.latency_ms / 1000, -1) for at, o in zip(arrive, outcomes, strict=True)]
    )
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def predicted(outputs: Mapping[str, Any]) -> int:
    """The class a classifier's first output picks."""
    return int(np.asarray(next(iter(outputs.values()))).reshape(-1).argmax())


def measure(
    demo: DemoModels, tasks: int, wan_ms: float, threshold: float, seed: int, drops: Drops,
    arrive: list[float], workers: int, connections: int, console: Console,
) -> tuple[dict[str, list[Outcome]], list[Task], list[float]]:  # fmt: skip
    """Run the four strategies over one workload; also time the edgeos decision alone."""
    with np.load(demo.eval_set) as data:
        rows = np.asarray(data[INPUT_NAME], dtype=np.float32)
        labels = np.asarray(data["labels"])
    work = workload(labels, tasks, seed)
    policy = PolicyManifest.model_validate(
        {"kind": "policy", "name": "bench", "version": "1",
         "venues": [{"privacy": "restricted", "venue": "edge"},
                    {"privacy": "internal", "venue": "any"},
                    {"privacy": "public", "venue": "any"}]}
    )  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as tmp,
        Database(Path(tmp) / "node.db") as db,
        cloud_venue(Path(tmp), demo, wan_ms / 1000, connections) as cloud,
    ):
        registry = ModelRegistry(db, Path(tmp) / "models")
        registry.add(demo.models[SMALL], name=SMALL, manifest=demo.manifests[SMALL])
        host = ModelHost(registry, HostConfig())
        edge_info = VenueInfo("edge", on_device=True,
                              models={SMALL: Offer(SMALL, demo.metrics[SMALL].accuracy)})  # fmt: skip
        edge = DeviceVenue(host, edge_info, workers)
        venues: list[Venue] = [edge, cloud]
        router = Router(venues, LinkMonitor(venues, interval=0.2), cloud_rule=policy.venue_for)
        for _ in range(5):  # load both models and open the connection before timing
            edge.infer(SMALL, {INPUT_NAME: rows[:1]})
            cloud.infer(XL, {INPUT_NAME: rows[:1]})
        # As the node does once started: what lives as long as the process is kept out of
        # the collector's way, so a collection does not stall every task in flight.
        gc.collect()
        gc.freeze()

        def all_edge(task: Task, x: dict[str, Any], _arrived: float) -> Outcome:
            answer = edge.infer(SMALL, x)
            return Outcome(predicted(answer.outputs) == task.label, 0.0, 0.0, False)

        def all_cloud(task: Task, x: dict[str, Any], _arrived: float) -> Outcome:
            try:
                answer = cloud.infer(XL, x)
            except UnavailableError:
                return Outcome(False, 0.0, 0.0, False, failed=True)
            return Outcome(predicted(answer.outputs) == task.label, 0.0, PRICE, True)

        def cascade(task: Task, x: dict[str, Any], _arrived: float) -> Outcome:
            answer = edge.infer(SMALL, x)
            kept = Outcome(predicted(answer.outputs) == task.label, 0.0, 0.0, False)
            if confidence(answer.outputs) >= threshold:
                return kept
            try:
                answer = cloud.infer(XL, x)
            except UnavailableError:
                return kept
            return Outcome(predicted(answer.outputs) == task.label, 0.0, PRICE, True)

        def edgeos(task: Task, x: dict[str, Any], arrived: float) -> Outcome:
            needs = Needs(task.privacy, slo_ms=task.slo_ms, cascade=threshold)
            try:
                # The task's SLO runs from its arrival, as the table counts it.
                routed = router.route("bench", SMALL, x, needs, arrived=arrived)
            except RoutingError:
                return Outcome(False, 0.0, 0.0, False, failed=True)
            record = routed.record
            # A request that went out counts as sent to the cloud, answered in time or not.
            remote = "cloud" in (routed.venue, record.get("escalated_to")) or (
                record.get("escalation_late") == "cloud" and routed.cost > 0
            )
            return Outcome(predicted(routed.outputs) == task.label, 0.0, routed.cost, remote,
                           late="escalation_late" in record)  # fmt: skip

        results: dict[str, list[Outcome]] = {}
        router.start()
        try:
            for name, call in (("all-edge", all_edge), ("all-cloud", all_cloud),
                               ("cascade (confidence only)", cascade), ("edgeos", edgeos)):  # fmt: skip
                started, cpu = time.perf_counter(), time.process_time()
                results[name], peak = run_strategy(work, rows, call, cloud, drops, arrive)
                waited = f", more than its {TASK_THREADS} threads" if peak > TASK_THREADS else ""
                console.print(
                    f"{name}: {len(work)} tasks in {time.perf_counter() - started:.1f} s "
                    f"({time.process_time() - cpu:.1f} s of this process's CPU), at most "
                    f"{peak} in flight{waited}"
                )
            overhead = []
            for task in work:
                needs = Needs(task.privacy, slo_ms=task.slo_ms, cascade=threshold)
                started = time.perf_counter()
                router.plan(SMALL, needs)
                overhead.append((time.perf_counter() - started) * 1e6)
        finally:
            router.close()
            host.close()
    return results, work, overhead


def report(
    results: dict[str, list[Outcome]], work: list[Task], overhead: list[float], wan_ms: float,
    drops: Drops, bounds: str, console: Console,
) -> None:  # fmt: skip
    """Print the side-by-side table."""
    # All-cloud's cost had the link stayed up: every task priced once.
    all_cloud_cost = PRICE * len(work)
    down = sum(1 for i in range(len(work)) if drops.down(i))
    table = Table(title=f"{len(work)} tasks, cloud over mTLS + {wan_ms:g} ms WAN, {PRICE:g}/call, "
                  f"link down for {down} tasks, {bounds}")  # fmt: skip
    for column in ("strategy", "accuracy", "p50 ms", "p99 ms", "cost/decision",
                   "saving vs all-cloud", "SLO attained", "no answer", "to cloud",
                   "local-only to cloud"):  # fmt: skip
        table.add_column(column, justify="left" if column == "strategy" else "right")
    with_slo = [i for i, t in enumerate(work) if t.slo_ms is not None]
    for name, outcomes in results.items():
        latencies = np.array([o.latency_ms for o in outcomes])
        cost = sum(o.cost for o in outcomes)
        met = sum(
            1 for i in with_slo
            if not outcomes[i].failed and outcomes[i].latency_ms <= (work[i].slo_ms or 0.0)
        )  # fmt: skip
        leaked = sum(1 for t, o in zip(work, outcomes, strict=True)
                     if o.to_cloud and t.privacy == "local-only")  # fmt: skip
        # Rounded: summing a price a thousand times must not print as a -0% saving.
        saving = round(1 - cost / all_cloud_cost, 6) + 0.0 if all_cloud_cost else 0.0
        table.add_row(
            name,
            f"{np.mean([o.correct for o in outcomes]):.2%}",
            f"{np.percentile(latencies, 50):.2f}",
            f"{np.percentile(latencies, 99):.2f}",
            f"{cost / len(outcomes):.6f}",
            f"{saving:.0%}",
            f"{met / len(with_slo):.1%}" if with_slo else "-",
            str(sum(o.failed for o in outcomes)),
            str(sum(o.to_cloud for o in outcomes)),
            str(leaked),
        )
    console.print(table)
    console.print(
        f"edgeos decision overhead (Router.plan): p50 {np.percentile(overhead, 50):.1f} us, "
        f"p99 {np.percentile(overhead, 99):.1f} us"
    )
    local_only = sum(1 for t in work if t.privacy == "local-only")
    console.print(f"{local_only} local-only tasks in the stream.")
    for line in goals(results, work):
        console.print(line)


def goals(results: dict[str, list[Outcome]], work: list[Task]) -> list[str]:
    """The edgeos decision against the goals, each met or missed with its figures.

    Accuracy is held against all-cloud on the tasks it answered (the stricter reference:
    counted over every task, its unanswered tasks would flatter edgeos)."""
    ours, cloud = results["edgeos"], results["all-cloud"]
    answered = [o for o in cloud if not o.failed]
    reference = float(np.mean([o.correct for o in answered])) if answered else 0.0
    accuracy = float(np.mean([o.correct for o in ours]))
    share = sum(o.cost for o in ours) / (PRICE * len(work))
    with_slo = [(t, o) for t, o in zip(work, ours, strict=True) if t.slo_ms is not None]
    attained = (
        sum(1 for t, o in with_slo if not o.failed and o.latency_ms <= (t.slo_ms or 0.0))
        / len(with_slo) if with_slo else 1.0
    )  # fmt: skip
    leaked = sum(1 for t, o in zip(work, ours, strict=True)
                 if o.to_cloud and t.privacy == "local-only")  # fmt: skip
    missed = [o for t, o in with_slo if o.failed or o.latency_ms > (t.slo_ms or 0.0)]
    late = sum(o.late for o in missed)
    remote = sum(o.to_cloud and not o.late for o in missed)

    def verdict(met: bool) -> str:
        return "met" if met else "MISSED"

    return [
        f"goal: accuracy within 1 point of all-cloud ({reference:.2%} where it answered): "
        f"{accuracy:.2%}, {verdict(accuracy >= reference - 0.01)}",
        f"goal: cost at most 40% of all-cloud's: {share:.1%}, {verdict(share <= 0.40)}",
        f"goal: at least 99% of SLOs attained: {attained:.1%}, {verdict(attained >= 0.99)} "
        f"(missed: {len(missed) - remote - late} on the edge, {remote} answered by the cloud, "
        f"{late} after an escalation given up on; escalations given up on at the SLO: "
        f"{sum(o.late for o in ours)} in all)",
        f"goal: no privacy violation: {leaked} local-only tasks sent to the cloud, "
        f"{verdict(leaked == 0)}",
    ]


def main(argv: list[str] | None = None) -> int:
    """Build the demo models if needed, run the four strategies, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("var/demo-models"))
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--wan-ms", type=float, default=40.0)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--down-every", type=int, default=2000, help="tasks per link cycle")
    parser.add_argument("--down-for", type=int, default=200, help="tasks per cycle, link down")
    parser.add_argument("--rate", type=float, default=250.0, help="task arrivals per second")
    parser.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson")
    parser.add_argument(
        "--workers",
        type=int,
        default=HostConfig().inference_threads,
        help="edge inferences at once, at most (default: one per core)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="cloud calls in flight, at most (the venue's connection pool)",
    )
    args = parser.parse_args(argv)
    if args.down_every < 1 or not 0 <= args.down_for <= args.down_every:
        parser.error("--down-for must be between 0 and --down-every, which is at least 1")
    if args.rate <= 0 or args.workers < 1 or args.connections < 1:
        parser.error("--rate must be positive, --workers and --connections at least 1")
    console = Console()
    demo = build_demo_models(args.models)
    drops = Drops(args.down_every, args.down_for)
    arrive = arrivals(args.tasks, args.rate, args.arrivals == "poisson", args.seed)
    results, work, overhead = measure(
        demo, args.tasks, args.wan_ms, args.threshold, args.seed, drops, arrive, args.workers,
        args.connections, console,
    )  # fmt: skip
    bounds = f"{args.workers} workers, {args.connections} connections"
    report(results, work, overhead, args.wan_ms, drops, bounds, console)
    leaked = [
        t for t, o in zip(work, results["edgeos"], strict=True)
        if o.to_cloud and t.privacy == "local-only"
    ]  # fmt: skip
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
