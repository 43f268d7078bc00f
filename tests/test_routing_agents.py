"""ctx.infer in real runs: decisions journaled and explained, shown by the CLI, replayed."""

from __future__ import annotations

import asyncio
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from edgeos.agents import manage, store
from edgeos.agents.executor import Executor
from edgeos.agents.replay import replay
from edgeos.cli.main import app
from edgeos.demo.train import DemoModels
from edgeos.errors import ManifestError
from edgeos.node.daemon import Node
from edgeos.node.process import node_process
from edgeos.routing.stats import agent_costs
from edgeos.routing.venues import Offer
from edgeos.settings import load_settings
from edgeos.state import Database, journal
from edgeos.state.writer import GroupWriter
from tests.routing_support import SMALL, XL, V2Server, demo_host, remote, router_of

STEP = """
def decide(ctx, data):
    out = ctx.infer("stockout-risk", {"features": [data["features"]]})
    return {"stockout": round(float(out["probabilities"][0][1]), 6)}
"""


def bundle(root: Path, **routing: Any) -> Path:
    directory = root / "bundle"
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"name": "shop", "version": "1.0", "steps": ["decide"], "models": [SMALL],
           "retry": {"max_attempts": 1}, "routing": routing}  # fmt: skip
    (directory / "agent.yaml").write_text(yaml.safe_dump(doc))
    (directory / "agent.py").write_text(textwrap.dedent(STEP))
    return directory


def test_decisions_are_journaled_explained_shown_counted_and_replayed(
    tmp_path: Path, demo_models: DemoModels
) -> None:
    data_dir = tmp_path / "node"
    runner = CliRunner()
    with np.load(demo_models.eval_set) as data:
        rows = np.asarray(data["features"][:12], dtype=np.float32)
    with Database(data_dir / "node.db") as db, Database(tmp_path / "venue" / "node.db") as vdb:
        host = demo_host(db, data_dir, demo_models, (SMALL,))
        venue_host = demo_host(vdb, tmp_path / "venue", demo_models, (XL,))
        server = V2Server(venue_host).start()
        venue = remote("cloud", server.url, price=0.0004, models={SMALL: Offer(XL, 0.93)})
        router = router_of(host, venue)
        manage.add_agent(db, bundle(tmp_path, cascade=0.9), data_dir / "agents",
                         models=[SMALL], connectors=[])  # fmt: skip

        async def go() -> list[str]:
            writer = GroupWriter(db).start()
            executor = Executor(db, writer, host=host, scan_interval=0.05)
            executor.router = router
            await executor.start()
            try:
                ids = [
                    await executor.submit("shop", data={"features": row.tolist()}) for row in rows
                ]
                for run_id in ids:
                    assert (await executor.wait(run_id)).state == "succeeded"
                return ids
            finally:
                await executor.stop()
                writer.stop()

        try:
            ids = asyncio.run(go())
        finally:
            router.close()
            server.stop()
            venue_host.close()
            host.close()
        decisions = [
            r.payload for i in ids for r in journal.for_run(db, i) if r.kind == "venue_decided"
        ]
        assert len(decisions) == len(ids)
        escalated = [d for d in decisions if d.get("escalated_to") == "cloud"]
        assert escalated
        assert len(escalated) < len(decisions)
        for d in decisions:
            assert d["venue"] == "edge"
            assert d["cascade"] == 0.9
            assert d["reasons"]
            cloud = next(a for a in d["alternatives"] if a["venue"] == "cloud")
            assert cloud["cost"] == 0.0004
            assert cloud["eligible"]
        # The run's cost is the routed calls' cost.
        assert store.run(db, ids[decisions.index(escalated[0])]).cost == 0.0004
        costs = agent_costs(db)
        assert len(costs) == 1
        assert costs[0].decisions == len(ids)
        assert costs[0].cost == pytest.approx(0.0004 * len(escalated))
        assert costs[0].all_cloud_cost == pytest.approx(0.0004 * len(ids))
        assert costs[0].by_venue["cloud"][0] == len(escalated)

        # Replay serves the journaled outputs: no venue is called (none is running now).
        settings = load_settings({"data_dir": data_dir})
        for run_id in ids:
            report = replay(db, run_id, settings=settings)
            assert report.same, report.lines()

    shown = runner.invoke(app, ["runs", "show", ids[decisions.index(escalated[0])],
                                "--data-dir", str(data_dir)], env={"COLUMNS": "250"})  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert f"{SMALL} ran on cloud ({XL}" in shown.output
    assert "because cascade: run on edge first" in shown.output
    assert "escalated to cloud" in shown.output
    stats = runner.invoke(app, ["routing", "stats", "--data-dir", str(data_dir)],
                          env={"COLUMNS": "200"})  # fmt: skip
    assert stats.exit_code == 0, stats.output
    assert f"shop: {len(ids)} decisions ({len(escalated)} escalated)" in stats.output
    saved = 0.0004 * (len(ids) - len(escalated))
    assert f"saved {saved:.6f}" in stats.output


def test_routing_stats_tells_late_escalations_apart(tmp_path: Path) -> None:
    # An escalation that answered after the SLO was paid for, but the edge answer stood.
    data_dir = tmp_path / "node"
    decided = [
        {"venue": "edge", "cost": 0.0, "all_cloud_cost": 0.0004},
        {"venue": "edge", "escalated_to": "cloud", "cost": 0.0004, "all_cloud_cost": 0.0004},
        {"venue": "edge", "escalation_late": "cloud", "cost": 0.0004, "all_cloud_cost": 0.0004},
    ]
    with Database(data_dir / "node.db") as db, db.transaction() as conn:
        conn.execute(
            "INSERT INTO runs (id, agent, agent_version, trigger, input, state, seed, "
            "created_at, updated_at) VALUES ('r1', 'shop', '1', 'manual', '{}', 'succeeded', "
            "1, 1.0, 1.0)"
        )
        for record in decided:
            journal.append(conn, "r1", "venue_decided", record, step="reason", at=1.0)
    stats = CliRunner().invoke(
        app, ["routing", "stats", "--data-dir", str(data_dir)], env={"COLUMNS": "200"}
    )
    assert stats.exit_code == 0, stats.output
    assert "shop: 3 decisions (1 escalated, 1 answered too late: the edge answer stood)" in (
        stats.output
    )


def test_routing_needs_in_agent_yaml_are_checked(tmp_path: Path) -> None:
    from edgeos.agents.bundle import load_bundle

    with pytest.raises(ManifestError, match=r"field 'routing.privacy'"):
        load_bundle(bundle(tmp_path / "a", privacy="secret"))
    with pytest.raises(ManifestError, match=r"field 'routing.cascade'"):
        load_bundle(bundle(tmp_path / "b", cascade=1.5))
    with pytest.raises(ManifestError, match=r"field 'routing.slo_ms'"):
        load_bundle(bundle(tmp_path / "c", slo_ms=0))


def test_a_node_routes_through_its_venues_yaml_and_counts_at_metrics(
    tmp_path: Path, demo_models: DemoModels
) -> None:
    data_dir = tmp_path / "node"
    with Database(data_dir / "node.db") as db:
        demo_host(db, data_dir, demo_models, (SMALL,)).close()
        manage.add_agent(db, bundle(tmp_path, min_quality=0.9), data_dir / "agents",
                         models=[SMALL], connectors=[])  # fmt: skip
    with Database(tmp_path / "venue" / "node.db") as vdb:
        venue_host = demo_host(vdb, tmp_path / "venue", demo_models, (XL,))
        server = V2Server(venue_host).start()
        (data_dir / "venues.yaml").write_text(
            yaml.safe_dump({"probe_interval": "200ms", "venues": {
                "edge": {"type": "local", "models": {SMALL: {"quality": 0.86}}},
                "lab": {"type": "v2", "url": server.url, "price_per_call": 0.0002,
                        "models": {SMALL: {"model": XL, "quality": 0.93}}}}})
        )  # fmt: skip
        try:
            with node_process(data_dir) as node, node.client(timeout=5.0) as http:
                body = {"input": {"features": [0.0] * 16}}
                started = http.post("/api/agents/shop/runs", json=body)
                assert started.status_code == 201, started.text
                run_id = started.json()["run_id"]
                deadline = time.monotonic() + 20
                while http.get(f"/api/runs/{run_id}").json()["state"] != "succeeded":
                    assert time.monotonic() < deadline, http.get(f"/api/runs/{run_id}").text
                    time.sleep(0.05)
                page = http.get("/metrics").text
        finally:
            server.stop()
            venue_host.close()
    # The quality floor sent it to the venue that meets it.
    assert 'edgeos_routing_cost_total{agent="shop",venue="lab"} 0.0002' in page
    assert 'edgeos_venue_up{venue="lab"} 1' in page
    assert server.requests == 1
    # A bad venues.yaml: the node does not start, and says which file and field.
    (data_dir / "venues.yaml").write_text("venues:\n  lab: {type: v2, models: {m: {}}}\n")
    refused = Node(load_settings({"data_dir": data_dir}))
    with pytest.raises(ManifestError, match=r"venues\.yaml: field 'venues.lab': .*needs its url"):
        refused.open()
    refused.close()


def test_routing_check_probes_every_remote_venue(tmp_path: Path, demo_models: DemoModels) -> None:
    data_dir = tmp_path / "node"
    with Database(data_dir / "node.db") as db:
        host = demo_host(db, data_dir, demo_models, (SMALL,))
        server = V2Server(host).start()
        dead = V2Server(host)  # never started: nothing listens on its port
        (data_dir / "venues.yaml").write_text(
            yaml.safe_dump({"venues": {
                "up": {"type": "v2", "url": server.url,
                       "models": {SMALL: {}, "forecast": {"model": "nope"}}},
                "down": {"type": "v2", "url": dead.url, "timeout": "1s", "models": {SMALL: {}}}}})
        )  # fmt: skip
        try:
            result = CliRunner().invoke(
                app, ["routing", "check", "--data-dir", str(data_dir)], env={"COLUMNS": "250"}
            )
        finally:
            server.stop()
            host.close()
    assert result.exit_code == 1, result.output
    assert "up: online" in result.output
    assert f"{SMALL} ({SMALL}): served" in result.output
    assert "forecast (nope): venue up (GET /v2/models/nope)" in result.output
    assert f"down: offline (venue down at {dead.url} does not answer" in result.output
