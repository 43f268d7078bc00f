"""Approvals through the fleet: devices report escalations over mTLS, operators answer
them through the API and the CLI, the answer reaches the device (at once when it is
long-polling), and a real node applies it as it would a local answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeos.errors import ConfigError, ConflictError, PermissionDeniedError
from edgeos.state import Database
from tests.fleet_support import (
    Device,
    FleetServer,
    asking_agent_dir,
    asking_node,
    audit_rows,
    enroll_device,
    fleet_config,
    join_token,
    table_snapshot,
    wait_for,
)


def escalation(eid: str = "run-1:0:0", **overrides: Any) -> dict[str, Any]:
    """An open escalation as a node reports it."""
    doc = {
        "id": eid, "agent": "restock", "run_id": eid.split(":")[0], "step": "decide",
        "question": "Reorder 40 units of milk?", "options": ["yes", "no"], "proposal": "yes",
        "default": "no", "deadline": time.time() + 600,
    }  # fmt: skip
    doc.update(overrides)
    return doc


def report(
    device: Device, open_: list[dict[str, Any]] | None = None, **body: Any
) -> httpx.Response:
    """POST /api/v1/escalations as ``device``."""
    doc: dict[str, Any] = {"device_id": device.device_id, "open": open_, **body}
    return device.http.post("/api/v1/escalations", json=doc)


@pytest.fixture
def device(running_fleet: FleetServer, tmp_path: Path) -> Iterator[Device]:
    """One enrolled device with one open escalation reported."""
    dev = enroll_device(running_fleet, join_token(running_fleet), tmp_path / "devices")
    try:
        assert report(dev, [escalation()]).json() == {"answers": []}
        yield dev
    finally:
        dev.close()


def answer(fleet: FleetServer, device_id: str, choice: str, token: str | None = None) -> None:
    """Answer run-1's escalation as the admin (or ``token``)."""
    with fleet.client(token) as client:
        client.answer_approval(device_id, "run-1:0:0", choice)


def test_an_operator_answer_reaches_the_device_and_its_result_comes_back(
    running_fleet: FleetServer,
    device: Device,
) -> None:
    with running_fleet.client() as admin:
        (row,) = admin.approvals(state="open")
        assert (row["device_id"], row["id"], row["options"]) == (device.device_id, "run-1:0:0",
                                                                  ["yes", "no"])  # fmt: skip
        answered = admin.answer_approval(device.device_id, "run-1:0:0", "no", "stock is fine")
        assert (answered["state"], answered["answer"]) == ("answered", "no")
        # Delivered on every report until the device says what it did with it.
        for _ in range(2):
            (answer,) = report(device).json()["answers"]
            assert answer == {"id": "run-1:0:0", "choice": "no", "by": "operator:admin",
                              "note": "stock is fine"}  # fmt: skip
        done = {"id": "run-1:0:0", "applied": True}
        assert report(device, [], results=[done]).json() == {"answers": []}
        (row,) = admin.approvals(device=device.device_id)
        assert row["state"] == "applied"
    (entry,) = audit_rows(running_fleet, action="approval.answer")
    assert (entry["actor"], entry["outcome"]) == ("operator:admin", "ok")


def test_a_long_polling_device_hears_of_an_answer_at_once_and_no_other_wakes(
    running_fleet: FleetServer, device: Device, tmp_path: Path
) -> None:
    other = enroll_device(running_fleet, join_token(running_fleet), tmp_path / "other")
    try:
        revision = device.sync().json()["revision"]
        other_revision = other.sync().json()["revision"]
        polls: dict[str, tuple[int, float]] = {}

        def poll(dev: Device, known: int, wait_s: float) -> None:
            started = time.monotonic()
            answer = dev.sync(revision=known, wait_s=wait_s).json()
            polls[dev.device_id] = (answer["revision"], time.monotonic() - started)

        waiting = threading.Thread(target=poll, args=(other, other_revision, 4))
        waiting.start()
        answered = threading.Timer(0.5, answer, (running_fleet, device.device_id, "yes"))
        answered.start()
        poll(device, revision, 20)
        answered.join()
        waiting.join()
        woke, took = polls[device.device_id]
        assert woke > revision
        assert took < 5  # not the 20 s the poll may wait
        assert [a["choice"] for a in report(device).json()["answers"]] == ["yes"]
        # The other device's poll ran its course: nothing changed for it.
        assert polls[other.device_id][0] == other_revision
        assert polls[other.device_id][1] >= 3.5
    finally:
        other.close()


def test_answers_the_device_refuses_or_closed_escalations(
    running_fleet: FleetServer,
    device: Device,
) -> None:
    with running_fleet.client() as admin:
        admin.answer_approval(device.device_id, "run-1:0:0", "yes")
        refused = {"id": "run-1:0:0", "applied": False, "detail": "answered on the device"}
        report(device, [escalation("run-2:0:0")], results=[refused])
        # Answered on the device before anyone here did: it is closed, not answerable.
        report(device, [])
        rows = {r["id"]: r for r in admin.approvals(state=None)}
        assert (rows["run-1:0:0"]["state"], rows["run-1:0:0"]["detail"]) == (
            "refused", "answered on the device")  # fmt: skip
        assert rows["run-2:0:0"]["state"] == "closed"
        with pytest.raises(ConflictError, match="closed"):
            admin.answer_approval(device.device_id, "run-2:0:0", "yes")
        with pytest.raises(ConflictError, match="refused by operator:admin"):
            admin.answer_approval(device.device_id, "run-1:0:0", "no")


def test_bad_answers_are_refused_and_change_nothing(
    running_fleet: FleetServer,
    device: Device,
) -> None:
    report(device, [escalation(), escalation("run-9:0:0", deadline=time.time() - 1)])
    with running_fleet.client() as admin:
        reader = admin.create_token("viewer", ["read"])["token"]
    before = table_snapshot(running_fleet.db)
    with running_fleet.client() as admin:
        with pytest.raises(ConfigError, match="'maybe' is not an option"):
            admin.answer_approval(device.device_id, "run-1:0:0", "maybe")
        with pytest.raises(ConflictError, match="passed its deadline"):
            admin.answer_approval(device.device_id, "run-9:0:0", "yes")
        with pytest.raises(Exception, match="no escalation"):
            admin.answer_approval("another-device", "run-1:0:0", "yes")
    with running_fleet.client(reader) as viewer:
        assert len(viewer.approvals()) == 2  # reading is allowed
        with pytest.raises(PermissionDeniedError, match="lacks the 'deploy' scope"):
            viewer.answer_approval(device.device_id, "run-1:0:0", "yes")
    assert table_snapshot(running_fleet.db) == before
    refusals = audit_rows(running_fleet, outcome="refused")
    assert any(r["actor"] == "operator:viewer" for r in refusals)
    assert sum(r["action"] == "approval.answer" for r in refusals) == 3


def test_a_device_sees_and_settles_only_its_own(
    running_fleet: FleetServer,
    device: Device,
    tmp_path: Path,
) -> None:
    other = enroll_device(running_fleet, join_token(running_fleet), tmp_path / "other")
    with running_fleet.client() as admin, other.http:
        admin.answer_approval(device.device_id, "run-1:0:0", "yes")
        # Another device neither hears the answer nor can settle it, even naming its id.
        assert report(other, [], results=[{"id": "run-1:0:0", "applied": False}]).json() == {
            "answers": []
        }
        assert admin.approvals(device=device.device_id)[0]["state"] == "answered"
        # Nor report as the device.
        forged = other.http.post(
            "/api/v1/escalations", json={"device_id": device.device_id, "open": []}
        )
        assert forged.status_code == 403, forged.text
        assert admin.approvals(device=device.device_id)[0]["state"] == "answered"
        # A revoked device is refused altogether.
        admin.revoke_device(other.device_id)
        assert report(other, []).status_code == 401
    actions = {(r["actor"], r["action"]) for r in audit_rows(running_fleet, outcome="refused")}
    assert (f"device:{other.device_id}", "escalations.report") in actions


def test_malformed_reports_are_refused(
    running_fleet: FleetServer,
    device: Device,
) -> None:
    before = table_snapshot(running_fleet.db)
    too_many = [escalation(f"run-{i}:0:0") for i in range(501)]
    for body in (
        {"device_id": device.device_id, "open": too_many},
        {"device_id": device.device_id, "open": [escalation(options=[])]},
        {"device_id": device.device_id, "open": [{"id": "x"}]},
        {"device_id": device.device_id, "surprise": 1},
    ):
        refused = device.http.post("/api/v1/escalations", json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "config"
    assert table_snapshot(running_fleet.db) == before


def test_the_cli_lists_and_answers(
    running_fleet: FleetServer,
    device: Device,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from edgeos.cli.main import build_app

    monkeypatch.setenv("EDGEOS_FLEET_CONFIG", str(tmp_path / "login.json"))
    runner, app = CliRunner(), build_app()
    logged = runner.invoke(app, ["fleet", "login", running_fleet.url, "--token",
                                 running_fleet.admin_token])  # fmt: skip
    assert logged.exit_code == 0, logged.output
    listed = runner.invoke(app, ["fleet", "approvals", "list"], env={"COLUMNS": "250"})
    assert listed.exit_code == 0, listed.output
    assert "Reorder 40 units of milk?" in listed.output
    answered = runner.invoke(
        app, ["fleet", "approvals", "answer", device.device_id, "run-1:0:0", "no"]
    )
    assert answered.exit_code == 0, answered.output
    assert "answered run-1:0:0" in answered.output
    again = runner.invoke(app, ["fleet", "approvals", "answer", device.device_id, "run-1:0:0",
                                "yes"])  # fmt: skip
    # The command's own error (the entry point turns it into a message and exit code 1).
    assert isinstance(again.exception, ConflictError)
    assert "answered by operator:admin" in str(again.exception)


# -- a real node --------------------------------------------------------------------------


@pytest.fixture
def quick_fleet(tmp_path: Path, fleet_db_url: str) -> Iterator[FleetServer]:
    """A fleet whose nodes sync every second: a new escalation reaches it within one."""
    server = FleetServer(fleet_config(tmp_path / "fleet", fleet_db_url, sync_interval_s=1.0))
    try:
        yield server.start()
    finally:
        server.stop()


def journal_of(node: Any, run_id: str) -> dict[str, Any]:
    """The node's run ``run_id`` with its journal, through the node's API."""
    doc: dict[str, Any] = httpx.get(
        f"{node.url}/api/runs/{run_id}", headers=node.headers, timeout=10
    ).json()
    return doc


def test_a_real_node_applies_the_fleet_answer_as_a_local_one(
    quick_fleet: FleetServer, tmp_path: Path
) -> None:
    node = asking_node(tmp_path / "node", quick_fleet.url, join_token(quick_fleet))
    with node, quick_fleet.client() as admin:
        start = httpx.post(f"{node.url}/api/agents/restock/runs", headers=node.headers,
                           timeout=10, json={"input": {"sku": "milk", "units": 40}})  # fmt: skip
        run_id = start.json()["run_id"]
        (row,) = wait_for("the escalation at the fleet", lambda: admin.approvals(state="open"))
        assert (row["agent"], row["question"], row["proposal"]) == (
            "restock", "Reorder 40 units of milk?", "yes")  # fmt: skip
        admin.answer_approval(row["device_id"], row["id"], "no", "milk is in stock")
        run = wait_for("the run to finish with the answer",
                       lambda: (doc := journal_of(node, run_id))["state"] == "succeeded" and doc)  # fmt: skip
        assert run["outcome"] == {"sku": "milk", "reorder": False}
        (answered,) = [r["payload"] for r in run["journal"] if r["kind"] == "escalation_answered"]
        assert answered["by"] == "fleet:operator:admin"
        assert (answered["answer"], answered["override"]) == ("no", True)
        wait_for("the fleet to hear it was applied",
                 lambda: admin.approvals(state="applied"))  # fmt: skip

        # Answered on the node first: the fleet's answer is refused, cleanly.
        second = httpx.post(f"{node.url}/api/agents/restock/runs", headers=node.headers, timeout=10,
                            json={"input": {"sku": "eggs", "units": 12}}).json()["run_id"]  # fmt: skip
        (row,) = wait_for("the second escalation", lambda: admin.approvals(state="open"))
        local = httpx.post(f"{node.url}/api/approvals/{row['id']}", headers=node.headers,
                           timeout=10, json={"choice": "yes", "by": "alice"})  # fmt: skip
        assert local.json() == {"answered": True}
        try:
            admin.answer_approval(row["device_id"], row["id"], "no")
        except ConflictError:  # the node had already said it was closed
            pass
        else:  # delivered, and refused by the node
            wait_for("the node's refusal", lambda: admin.approvals(state="refused"))
        run = wait_for("the second run to finish",
                       lambda: (doc := journal_of(node, second))["state"] == "succeeded" and doc)  # fmt: skip
        answers = [r["payload"] for r in run["journal"] if r["kind"] == "escalation_answered"]
        assert [(a["answer"], a["by"]) for a in answers] == [("yes", "alice")]


# -- the node's relay, on a real node database ----------------------------------------------


def test_the_node_applies_answers_once_and_refuses_the_rest(db: Database, tmp_path: Path) -> None:
    from edgeos.agents import manage, store
    from edgeos.agents.context import EscalationPending
    from edgeos.agents.executor import park_for_person
    from edgeos.protocol.fleet import EscalationAnswer
    from edgeos.state import journal
    from edgeos.sync.approvals import EscalationRelay

    manage.add_agent(db, asking_agent_dir(tmp_path), tmp_path / "agents", models=[],
                     connectors=[])  # fmt: skip
    run_id = manage.queue_run(db, "restock", {"sku": "milk", "units": 40})
    asked = EscalationPending(f"{run_id}:0:0", "Reorder?", ["yes", "no"], "no", "yes", 600)
    with db.transaction() as conn:
        park_for_person(
            conn, run=store.run(db, run_id), step="decide", pending=asked, at=time.time()
        )
    relay = EscalationRelay(db)
    first, current = relay.report("dev-1") or pytest.fail("an open escalation is due")
    assert [(e.id, e.agent, e.proposal) for e in first.open or []] == [(asked.escalation_id,
                                                                         "restock", "yes")]  # fmt: skip
    relay.delivered(first, current)
    again, _ = relay.report("dev-1") or pytest.fail("open escalations are always due")
    assert again.open is None  # unchanged: not sent again

    def answer(choice: str, eid: str = asked.escalation_id) -> EscalationAnswer:
        return EscalationAnswer(id=eid, choice=choice, by="operator:ann", note="checked")

    results = relay.apply([answer("yes"), answer("yes"), answer("no"), answer("yes", "nope")])
    assert [(r.applied, r.detail) for r in results] == [
        (True, None),
        (True, None),  # delivered twice: recognised as applied, not applied twice
        (False, f"escalation {asked.escalation_id} was answered on the device by "
                "fleet:operator:ann"),
        (False, "no escalation with id 'nope'"),
    ]  # fmt: skip
    row = store.escalation(db, asked.escalation_id)
    assert (row.answer, row.answered_by, row.override) == ("yes", "fleet:operator:ann", False)
    assert store.run(db, run_id).state == "pending"  # the executor takes it from here
    kinds = [r.kind for r in journal.for_run(db, run_id)]
    assert kinds.count("escalation_answered") == 1
    settled, _ = relay.report("dev-1") or pytest.fail("results are due")
    assert (settled.open, len(settled.results)) == ([], 4)


def test_an_answer_through_one_replica_wakes_a_long_poll_held_by_another(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    config = running_fleet.config
    second = FleetServer(fleet_config(config.data_dir, config.database_url))
    second.admin_token = running_fleet.admin_token
    second.start(init=False)
    dev = enroll_device(second, join_token(running_fleet), tmp_path / "devices")
    try:
        assert report(dev, [escalation()]).json() == {"answers": []}
        revision = dev.sync().json()["revision"]
        answered = threading.Timer(0.5, answer, (running_fleet, dev.device_id, "yes"))
        started = time.monotonic()
        answered.start()
        woke = dev.sync(revision=revision, wait_s=20).json()  # held by the second replica
        answered.join()
        assert woke["revision"] > revision
        assert time.monotonic() - started < 5
    finally:
        dev.close()
        second.stop()
