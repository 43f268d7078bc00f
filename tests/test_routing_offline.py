"""Offline autonomy: fallback to the edge when the task allows, durable deferral otherwise."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from edgeos.agents import manage, store
from edgeos.agents.replay import replay
from edgeos.cli.main import app
from edgeos.demo.train import DemoModels
from edgeos.errors import ConfigError, ManifestError
from edgeos.manifests.agent import AgentManifest
from edgeos.manifests.loader import load_manifest
from edgeos.node.process import node_process
from edgeos.routing import deferral
from edgeos.routing.decide import CallDeferred, Needs
from edgeos.routing.venues import Offer
from edgeos.runtime import ModelHost
from edgeos.settings import load_settings
from edgeos.state import Database, journal
from tests.routing_support import SMALL, XL, V2Server, demo_host, remote, router_of


@pytest.fixture
def hosts(tmp_path: Path, demo_models: DemoModels) -> Iterator[tuple[ModelHost, ModelHost]]:
    """The device (small model) and another machine (both models) for a V2 server."""
    with (
        Database(tmp_path / "edge" / "node.db") as db,
        Database(tmp_path / "venue" / "node.db") as vdb,
    ):
        edge = demo_host(db, tmp_path / "edge", demo_models, (SMALL,))
        venue = demo_host(vdb, tmp_path / "venue", demo_models, (SMALL, XL))
        yield edge, venue
        edge.close()
        venue.close()


def rows(demo: DemoModels, n: int) -> np.ndarray:
    with np.load(demo.eval_set) as data:
        return np.asarray(data["features"][:n], dtype=np.float32)


def test_a_lost_link_falls_back_or_defers_as_each_task_allows(
    hosts: tuple[ModelHost, ModelHost], demo_models: DemoModels
) -> None:
    edge, venue_host = hosts
    server = V2Server(venue_host).start()
    lab = remote("lab", server.url, price=0.0002, timeout_s=1.0,
                 models={SMALL: Offer(XL, 0.93), XL: Offer(XL, 0.93)})  # fmt: skip
    router = router_of(edge, lab)
    x = {"features": rows(demo_models, 1)}
    try:
        assert router.route("a", SMALL, x, Needs(min_quality=0.9)).venue == "lab"
        server.stop()
        # The first call after the drop finds the link down and is decided again.
        fell = router.route("a", SMALL, x, Needs(min_quality=0.9, fallback="edge"))
        assert fell.venue == "edge"
        assert fell.record["fallback_from"] == "lab"
        assert "offline fallback: lab (quality 0.93) is offline" in fell.record["reasons"][1]
        # A task that will not take lower quality waits for the venue instead.
        with pytest.raises(CallDeferred, match="waits rather than take a lower-quality") as waits:
            router.route("a", SMALL, x, Needs(min_quality=0.9, fallback="wait"))
        assert waits.value.awaiting == ["lab"]
        # A model only the venue has waits whatever the task allows.
        with pytest.raises(CallDeferred, match="no reachable venue may run it"):
            router.route("a", XL, x, Needs(fallback="edge"))
        # Without a quality floor the edge is as good: no fallback, no wait.
        plain = router.route("a", SMALL, x, Needs(fallback="wait"))
        assert plain.venue == "edge"
        assert "fallback_from" not in plain.record
        # local-only data never waits for a venue off the device: the edge is all it has.
        private = router.route("a", SMALL, x, Needs("local-only", min_quality=0.9, fallback="wait"))
        assert private.venue == "edge"
        assert "fallback_from" not in private.record
        # Cascade: an unsure edge answer would escalate to the offline venue.
        unsure = next(
            r for r in rows(demo_models, 200)
            if float(edge.infer(SMALL, {"features": r[None]}).outputs["probabilities"].max()) < 0.9
        )  # fmt: skip
        kept = router.route("a", SMALL, {"features": unsure[None]}, Needs(cascade=0.9))
        assert kept.record["fallback_from"] == "lab"
        assert "the edge answer stands" in " ".join(kept.record["reasons"])
        with pytest.raises(CallDeferred, match="escalation offline"):
            router.route(
                "a", SMALL, {"features": unsure[None]}, Needs(cascade=0.9, fallback="wait")
            )
        assert server.requests == 1
    finally:
        router.close()


STEP = """
def decide(ctx, data):
    out = ctx.infer("stockout-risk-xl", {"features": [data["features"]]})
    return {"stockout": float(out["probabilities"][0][1])}
"""


def agent(root: Path, name: str, offline: dict[str, Any]) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    doc = {"name": name, "version": "1.0", "steps": ["decide"], "models": [SMALL],
           "retry": {"max_attempts": 1},
           "routing": {"models": [XL], "offline": {"fallback": "wait", **offline}}}  # fmt: skip
    (directory / "agent.yaml").write_text(yaml.safe_dump(doc))
    (directory / "agent.py").write_text(textwrap.dedent(STEP))
    return directory


def wait_until(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_deferred_calls_survive_sigkill_resume_on_reconnect_or_default(
    tmp_path: Path, hosts: tuple[ModelHost, ModelHost], demo_models: DemoModels
) -> None:
    _, venue_host = hosts
    data_dir = tmp_path / "node"
    with Database(data_dir / "node.db") as db:
        demo_host(db, data_dir, demo_models, (SMALL,)).close()
        manage.add_agent(db, agent(tmp_path, "patient", {"wait": "10m"}), data_dir / "agents",
                         models=[SMALL], connectors=[])  # fmt: skip
        manage.add_agent(db, agent(tmp_path, "hasty", {"wait": "1s", "default": {
            "probabilities": [[0.25, 0.75]]}}), data_dir / "agents", models=[SMALL],
            connectors=[])  # fmt: skip
    server = V2Server(venue_host)  # not serving yet: the link is down
    (data_dir / "venues.yaml").write_text(yaml.safe_dump({"probe_interval": "200ms", "venues": {
        "lab": {"type": "v2", "url": server.url, "price_per_call": 0.0002, "timeout": "1s",
                "models": {XL: {"quality": 0.93}}}}}))  # fmt: skip
    features = rows(demo_models, 3)
    body = [{"input": {"features": r.tolist()}} for r in features]
    node = node_process(data_dir)
    with node, node.client(timeout=5.0) as http:
        patient = [http.post("/api/agents/patient/runs", json=b).json()["run_id"] for b in body]
        with Database(data_dir / "node.db") as db:
            wait_until("three deferred calls",
                       lambda: len(deferral.queue(db)) == 3)  # fmt: skip
            assert {store.run(db, r).state for r in patient} == {"waiting_venue"}
        node.kill()  # SIGKILL: no shutdown code runs
    try:
        # Restarted with the link still down: the runs keep waiting; a task with a short
        # wait gets its declared default meanwhile.
        node = node_process(data_dir)
        with node, node.client(timeout=5.0) as http:
            hasty = http.post("/api/agents/hasty/runs", json=body[0]).json()["run_id"]
            done = wait_until(
                "the default",
                lambda: (
                    (run := http.get(f"/api/runs/{hasty}").json())["state"] == "succeeded" and run
                ),
            )
            assert done["outcome"] == {"stockout": 0.75}
            states = {http.get(f"/api/runs/{r}").json()["state"] for r in patient}
            assert states == {"waiting_venue"}
            # The venue comes back: the link monitor sees it, every waiting run resumes.
            server.start()
            for run_id in patient:
                wait_until(f"run {run_id}",
                           lambda r=run_id: http.get(f"/api/runs/{r}").json()["state"]
                           == "succeeded")  # fmt: skip
            assert server.requests == 3  # each call ran once, on the venue
    finally:
        server.stop()
    with Database(data_dir / "node.db") as db:
        for run_id in patient:
            kinds = [r.kind for r in journal.for_run(db, run_id)]
            assert kinds.count("call_deferred") == 1
            assert kinds.count("call_resumed") == 1
            assert kinds.count("venue_decided") == 1
            decided = next(r for r in journal.for_run(db, run_id) if r.kind == "venue_decided")
            assert decided.payload["venue"] == "lab"
        records = journal.for_run(db, hasty)
        defaulted = next(r for r in records if r.kind == "call_defaulted")
        assert defaulted.payload["default"] == {"probabilities": [[0.25, 0.75]]}
        decided = next(r for r in records if r.kind == "venue_decided")
        assert decided.payload["venue"] == "default"
        assert {c.state for c in deferral.queue(db, state=None)} == {"resumed", "defaulted"}
        assert journal.verify(db).ok
        # Replay serves the journaled outputs, the default included: no venue is asked.
        settings = load_settings({"data_dir": data_dir})
        for run_id in [*patient, hasty]:
            report = replay(db, run_id, settings=settings)
            assert report.same, report.lines()
    runner = CliRunner()
    shown = runner.invoke(app, ["runs", "show", hasty, "--data-dir", str(data_dir)],
                          env={"COLUMNS": "250"})  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert f"{XL} returned its declared default" in shown.output
    assert "waited for lab until the deadline" in shown.output
    listed = runner.invoke(app, ["routing", "deferred", "--all", "--data-dir", str(data_dir)],
                           env={"COLUMNS": "250"})  # fmt: skip
    assert listed.exit_code == 0, listed.output
    assert f"{hasty}:0:0" in listed.output
    assert "defaulted" in listed.output
    assert "resumed" in listed.output
    waiting = runner.invoke(app, ["routing", "deferred", "--data-dir", str(data_dir)])
    assert "no deferred calls" in waiting.output


def test_bad_offline_settings_are_refused_naming_the_field(tmp_path: Path) -> None:
    for offline, field in (({"fallback": "maybe"}, "fallback"), ({"wait": "-1s"}, "wait"),
                           ({"default": [0.5]}, "default")):  # fmt: skip
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump({"name": "a", "version": "1", "steps": ["s"],
                                        "routing": {"offline": offline}}))  # fmt: skip
        with pytest.raises(ManifestError, match=rf"routing\.offline\.{field}"):
            load_manifest(path, AgentManifest)
    with pytest.raises(ConfigError, match="fallback must be one of edge, wait"):
        Needs(fallback="maybe")
