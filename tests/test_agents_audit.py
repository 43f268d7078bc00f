"""Audit and control of agents: replay, KPIs, the CLI and the node's HTTP API."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from edgeos.agents import manage, store
from edgeos.agents.kpis import agent_kpis
from edgeos.agents.replay import replay
from edgeos.cli.main import app
from edgeos.node.process import node_process
from edgeos.state import Database
from tests.test_agents import ESCALATING, STEPS, install, make_bundle, running
from tests.test_connectors import Receiver

runner = CliRunner()


def finish_runs(db: Database, n: int, **submit: object) -> list[str]:
    async def go() -> list[str]:
        async with running(db) as ex:
            ids = [await ex.submit("inventory", **submit) for _ in range(n)]  # type: ignore[arg-type]
            for run_id in ids:
                await ex.wait(run_id)
            return ids

    return asyncio.run(go())


def test_replay_reproduces_every_decision(db: Database, tmp_path: Path) -> None:
    install(db, tmp_path)
    (run_id,) = finish_runs(db, 1, data={"sku": "R-1"})
    report = replay(db, run_id)
    assert report.same, report.lines()
    assert report.steps == 4
    assert "every decision matches" in report.lines()[0]


def test_replay_reports_a_changed_decision(db: Database, tmp_path: Path) -> None:
    install(db, tmp_path)
    (run_id,) = finish_runs(db, 1, data={"sku": "R-2"})
    agent = store.agent(db, "inventory")
    code = Path(agent.bundle_dir) / "agent.py"
    code.write_text(
        code.read_text().replace(
            '{"sku": data["sku"], "qty": 10}', '{"sku": data["sku"], "qty": 12}'
        )
    )
    report = replay(db, run_id)
    assert not report.same
    assert any(
        "effect supplier.reorder payload differs" in d and "'qty': 12" in d
        for d in report.differences
    )


def test_kpis_measure_latency_success_overrides_cost_and_recovery(
    db: Database, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, code=ESCALATING)
    manage.add_agent(db, bundle, tmp_path / "agents", models=[], connectors=["supplier"])

    async def go() -> None:
        async with running(db) as ex:
            ids = [await ex.submit("inventory", data={"sku": f"K-{i}"}) for i in range(4)]
            for i, run_id in enumerate(ids):
                await ex.wait(run_id)
                (esc,) = [e for e in store.escalations(db) if e.run_id == run_id]
                # Two people agree with the agent (yes), one overrides (no), one times out.
                if i < 3:
                    manage.answer(db, esc.id, "yes" if i < 2 else "no", by="ops")
                else:
                    with db.transaction() as conn:
                        conn.execute("UPDATE escalations SET deadline = 0 WHERE id = ?", (esc.id,))
                ex.nudge()
            for run_id in ids:
                for _ in range(200):  # the timed-out one waits for the next scan
                    if (await ex.wait(run_id)).state != "waiting_human":
                        break
                    await asyncio.sleep(0.02)
                assert store.run(db, run_id).state == "succeeded"

    asyncio.run(go())
    with db.transaction() as conn:  # a failure, then the next success: one recovery
        conn.execute(
            "INSERT INTO runs (id, agent, agent_version, trigger, input, state, step_count, seed, "
            "created_at, updated_at, finished_at) VALUES ('0000-failed', 'inventory', '1.0', "
            "'manual', 'null', 'failed', 1, 1, 0, 0, 1)"
        )
    kpis = agent_kpis(db, "inventory")
    assert (kpis.finished, kpis.succeeded, kpis.failed) == (5, 4, 1)
    assert kpis.success_rate == pytest.approx(0.8)
    assert (kpis.answered_by_people, kpis.overrides) == (3, 1)
    assert kpis.override_rate == pytest.approx(1 / 3)
    assert kpis.latency is not None
    assert kpis.latency.p50_ms > 0
    assert kpis.mttr_seconds is not None
    assert kpis.mttr_seconds > 0
    assert kpis.cost_per_decision == 0.0


def cli(*args: str, data_dir: Path) -> str:
    result = runner.invoke(app, [*args, "--data-dir", str(data_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_installs_runs_audits_and_answers(tmp_path: Path) -> None:
    data = tmp_path / "node"
    data.mkdir()
    (data / "connectors.yaml").write_text(
        yaml.safe_dump({"supplier": {"type": "http", "base_url": "http://127.0.0.1:9",
                                     "operations": {"reorder": {"method": "POST", "path": "/o"}}}})
    )  # fmt: skip
    bundle = make_bundle(tmp_path, code=ESCALATING)
    assert "installed agent inventory 1.0" in cli("agent", "add", str(bundle), data_dir=data)
    assert "active" in cli("agent", "list", data_dir=data)
    run_id = cli("agent", "run", "inventory", "--input", '{"sku": "CLI-1"}', data_dir=data).strip()
    with Database(data / "node.db") as db:

        async def go() -> None:
            async with running(db) as ex:
                assert (await ex.wait(run_id)).state == "waiting_human"
                listing = cli("approvals", "list", data_dir=data)
                assert "Reorder 10 of CLI-1?" in listing
                (esc,) = store.escalations(db)
                assert "answered" in cli(
                    "approvals", "answer", esc.id, "yes", "--note", "ok", data_dir=data
                )
                await asyncio.sleep(0.2)
                assert (await ex.wait(run_id)).state == "succeeded"

        asyncio.run(go())
    shown = cli("runs", "show", run_id, data_dir=data)
    for kind in (
        "run_started",
        "escalation_raised",
        "escalation_answered",
        "effect_enqueued",
        "run_finished",
    ):
        assert kind in shown
    assert run_id in cli("runs", "list", "--agent", "inventory", data_dir=data)
    assert "journal intact" in cli("journal", "verify", data_dir=data)
    assert "every decision matches" in cli("runs", "replay", run_id, data_dir=data)
    stats = cli("agent", "stats", "inventory", data_dir=data)
    assert "task success rate" in stats
    assert "100.0%" in stats
    raw = sqlite3.connect(data / "node.db")
    raw.execute("UPDATE journal SET at = at + 1 WHERE seq = 3")
    raw.commit()
    raw.close()
    bad = runner.invoke(app, ["journal", "verify", "--data-dir", str(data)], env={"COLUMNS": "200"})
    assert bad.exit_code == 1
    assert "journal broken at record 3" in bad.output
    assert "paused" in cli("agent", "pause", "inventory", data_dir=data)
    assert "resumed" in cli("agent", "resume", "inventory", data_dir=data)


def test_node_api_runs_agents_and_takes_answers(tmp_path: Path) -> None:
    receiver = Receiver()
    try:
        data = tmp_path / "node"
        data.mkdir()
        (data / "connectors.yaml").write_text(
            yaml.safe_dump({"supplier": {"type": "http", "base_url": receiver.url,
                                         "operations": {"reorder": {"method": "POST", "path": "/orders"}}}})
        )  # fmt: skip
        bundle = make_bundle(
            tmp_path,
            code=ESCALATING,
            triggers=[{"manual": True}, {"webhook": True}, {"event": "pos.sales"}],
        )
        with Database(data / "node.db") as db:
            manage.add_agent(db, bundle, data / "agents", models=[], connectors=["supplier"])
        with node_process(data) as node, node.client(timeout=5.0) as client:
            started = client.post("/api/agents/inventory/runs", json={"input": {"sku": "API-1"}})
            assert started.status_code == 201
            run_id = started.json()["run_id"]
            approvals = wait_for(lambda: client.get("/api/approvals").json())
            assert approvals[0]["question"] == "Reorder 10 of API-1?"
            answer = client.post(
                f"/api/approvals/{approvals[0]['id']}", json={"choice": "yes", "by": "ops"}
            )
            assert answer.json() == {"answered": True}
            wait_for(lambda: client.get(f"/api/runs/{run_id}").json()["state"] == "succeeded")
            wait_for(lambda: receiver.applied)
            (applied,) = receiver.applied
            assert (applied["sku"], applied["qty"], applied["path"]) == ("API-1", 10, "/orders")
            hook = client.post("/api/agents/inventory/webhook", json={"sku": "HOOK-1"})
            assert hook.status_code == 202
            event = client.post("/api/events/pos.sales", json={"sku": "EV-2"})
            assert event.status_code == 202
            (event_run,) = event.json()["run_ids"]
            assert client.get(f"/api/runs/{event_run}").json()["trigger"] == "event:pos.sales"
            bad = client.post("/api/agents/ghost/runs", json={})
            assert bad.status_code == 404
            assert "no agent named 'ghost'" in bad.json()["error"]
            not_json = client.post(f"/api/approvals/{approvals[0]['id']}", content=b"{")
            assert not_json.status_code == 400
            metrics = client.get("/metrics").text
            assert (
                'edgeos_agent_runs_finished_total{agent="inventory",outcome="succeeded"}' in metrics
            )
            assert 'edgeos_outbox_delivered_total{connector="supplier"}' in metrics
    finally:
        receiver.stop()


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


assert STEPS  # the shared agent code lives in test_agents
