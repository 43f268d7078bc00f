"""Routing: the edgeos venue decision against all-edge, all-cloud and a difficulty-only cascade.

    python bench/routing.py [--models var/demo-models] [--tasks 1000] [--wan-ms 40]
                            [--down-every 250 --down-for 25] [--gap-ms 10]

The demo's stockout models as an edge/cloud pair: the small model on the device's own
host, the xl model on a real fleet's cloud venue (a fleet process on loopback, reached
over mTLS with an enrolled device's certificate), every cloud call held back by a
simulated WAN delay (``--wan-ms``, each way together) and priced per call. One stream of
tasks, drawn from the held-out evaluation rows, each with a privacy class (local-only,
restricted, internal, public) and a latency SLO (none, a loose one, or one only the edge
can meet), arriving one every ``--gap-ms`` (or as soon as the previous one is done), is
run four ways in the same process, one after the other. The link drops
for stretches: the last ``--down-for`` tasks of every ``--down-every`` find the cloud
unreachable (connection refused at once), at the same tasks for every strategy.

- **all-edge**: every task on the small model;
- **all-cloud**: every task on the xl model in the cloud;
- **cascade**: RouteLLM/AutoMix style, difficulty alone: the edge first, the cloud when
  the edge's confidence is under the threshold, whatever the data's privacy or the SLO
  (the edge answer stands when the cloud cannot be reached);
- **edgeos**: ``Router.route`` with the task's needs, under a fleet policy that keeps
  restricted data on the edge (cascade mode with the same threshold), its link monitor
  probing the cloud every 200 ms.

Side by side: accuracy, p50/p99 end-to-end latency, cost per decision and the saving
against all-cloud, SLO attainment, tasks that got no answer, and how many local-only
tasks each sent to the cloud; and the edgeos decision's own overhead (``Router.plan``,
nothing called).
"""

from __future__ import annotations

import argparse
import random
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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
from edgeos.routing.v2_venue import ClientCertificate, V2Venue
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


class WanVenue:
    """A cloud venue behind a simulated WAN: every call and probe waits ``delay_s`` first;
    while ``down``, each is refused at once, as a lost link refuses connections."""

    def __init__(self, venue: V2Venue, delay_s: float) -> None:
        self.venue = venue
        self.info = venue.info
        self.delay_s = delay_s
        self.down = False

    def _cross(self) -> None:
        if self.down:
            raise UnavailableError(f"venue {self.info.name}: the WAN link is down")
        time.sleep(self.delay_s)

    def offer(self, model: str) -> Offer | None:
        """As the venue behind it."""
        return self.venue.offer(model)

    def infer(self, model: str, inputs: Mapping[str, Any]) -> VenueAnswer:
        """The venue's answer, a WAN round trip later."""
        self._cross()
        return self.venue.infer(model, inputs)

    def probe(self) -> None:
        """The venue's health, a WAN round trip later."""
        self._cross()
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
def cloud_venue(root: Path, demo: DemoModels, wan_s: float) -> Iterator[WanVenue]:
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
            yield WanVenue(venue, wan_s)
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


def run_strategy(
    tasks: list[Task],
    rows: np.ndarray,
    call: Callable[[Task, dict[str, Any]], Outcome],
    cloud: WanVenue,
    drops: Drops,
    gap_s: float,
) -> list[Outcome]:
    """Run every task through ``call``, timing each end to end, the link dropping as given.

    Tasks arrive every ``gap_s``: a link monitor notices a recovery within its probe
    interval of wall-clock time, whatever the number of tasks in between.
    """
    outcomes = []
    begun = time.perf_counter()
    for index, task in enumerate(tasks):
        time.sleep(max(0.0, begun + index * gap_s - time.perf_counter()))
        cloud.down = drops.down(index)
        x = {INPUT_NAME: rows[task.row : task.row + 1]}
        started = time.perf_counter()
        outcome = call(task, x)
        outcome.latency_ms = (time.perf_counter() - started) * 1000
        outcomes.append(outcome)
    cloud.down = False
    return outcomes


def predicted(outputs: Mapping[str, Any]) -> int:
    """The class a classifier's first output picks."""
    return int(np.asarray(next(iter(outputs.values()))).reshape(-1).argmax())


def measure(
    demo: DemoModels, tasks: int, wan_ms: float, threshold: float, seed: int, drops: Drops,
    gap_s: float, console: Console,
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
        cloud_venue(Path(tmp), demo, wan_ms / 1000) as cloud,
    ):
        registry = ModelRegistry(db, Path(tmp) / "models")
        registry.add(demo.models[SMALL], name=SMALL, manifest=demo.manifests[SMALL])
        host = ModelHost(registry, HostConfig())
        edge_info = VenueInfo("edge", on_device=True,
                              models={SMALL: Offer(SMALL, demo.metrics[SMALL].accuracy)})  # fmt: skip
        edge = LocalVenue(host, edge_info)
        venues: list[Venue] = [edge, cloud]
        router = Router(venues, LinkMonitor(venues, interval=0.2), cloud_rule=policy.venue_for)
        for _ in range(5):  # load both models and open the connection before timing
            edge.infer(SMALL, {INPUT_NAME: rows[:1]})
            cloud.infer(XL, {INPUT_NAME: rows[:1]})

        def all_edge(task: Task, x: dict[str, Any]) -> Outcome:
            answer = edge.infer(SMALL, x)
            return Outcome(predicted(answer.outputs) == task.label, 0.0, 0.0, False)

        def all_cloud(task: Task, x: dict[str, Any]) -> Outcome:
            try:
                answer = cloud.infer(XL, x)
            except UnavailableError:
                return Outcome(False, 0.0, 0.0, False, failed=True)
            return Outcome(predicted(answer.outputs) == task.label, 0.0, PRICE, True)

        def cascade(task: Task, x: dict[str, Any]) -> Outcome:
            answer = edge.infer(SMALL, x)
            kept = Outcome(predicted(answer.outputs) == task.label, 0.0, 0.0, False)
            if confidence(answer.outputs) >= threshold:
                return kept
            try:
                answer = cloud.infer(XL, x)
            except UnavailableError:
                return kept
            return Outcome(predicted(answer.outputs) == task.label, 0.0, PRICE, True)

        def edgeos(task: Task, x: dict[str, Any]) -> Outcome:
            needs = Needs(task.privacy, slo_ms=task.slo_ms, cascade=threshold)
            try:
                routed = router.route("bench", SMALL, x, needs)
            except RoutingError:
                return Outcome(False, 0.0, 0.0, False, failed=True)
            remote = routed.venue == "cloud" or routed.record.get("escalated_to") == "cloud"
            return Outcome(predicted(routed.outputs) == task.label, 0.0, routed.cost, remote)

        results: dict[str, list[Outcome]] = {}
        router.start()
        try:
            for name, call in (("all-edge", all_edge), ("all-cloud", all_cloud),
                               ("cascade (confidence only)", cascade), ("edgeos", edgeos)):  # fmt: skip
                console.print(f"running {len(work)} tasks: {name}")
                results[name] = run_strategy(work, rows, call, cloud, drops, gap_s)
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
    drops: Drops, console: Console,
) -> None:  # fmt: skip
    """Print the side-by-side table."""
    # All-cloud's cost had the link stayed up: every task priced once.
    all_cloud_cost = PRICE * len(work)
    down = sum(1 for i in range(len(work)) if drops.down(i))
    table = Table(title=f"{len(work)} tasks, cloud over mTLS + {wan_ms:g} ms WAN, {PRICE:g}/call, "
                  f"link down for {down} tasks")  # fmt: skip
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
    console.print(f"{local_only} local-only tasks in the stream; edgeos sends none to the cloud.")


def main(argv: list[str] | None = None) -> int:
    """Build the demo models if needed, run the four strategies, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("var/demo-models"))
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--wan-ms", type=float, default=40.0)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--down-every", type=int, default=250, help="tasks per link cycle")
    parser.add_argument("--down-for", type=int, default=25, help="tasks per cycle, link down")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="between task arrivals")
    args = parser.parse_args(argv)
    if args.down_every < 1 or not 0 <= args.down_for <= args.down_every:
        parser.error("--down-for must be between 0 and --down-every, which is at least 1")
    console = Console()
    demo = build_demo_models(args.models)
    drops = Drops(args.down_every, args.down_for)
    results, work, overhead = measure(
        demo, args.tasks, args.wan_ms, args.threshold, args.seed, drops, args.gap_ms / 1000,
        console,
    )  # fmt: skip
    report(results, work, overhead, args.wan_ms, drops, console)
    leaked = [
        t for t, o in zip(work, results["edgeos"], strict=True)
        if o.to_cloud and t.privacy == "local-only"
    ]  # fmt: skip
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
