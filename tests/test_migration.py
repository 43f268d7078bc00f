"""Runs moved between nodes in signed envelopes: real bundles, real node databases, real
executors and delivery workers, a real HTTP receiver that counts deliveries by key, and
device certificates issued by a real fleet CA.

The destination in these tests is a second node database in the role of the cloud node.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from edgeos.agents import manage, store
from edgeos.agents.executor import Executor, cancel_run, create_run
from edgeos.agents.migration import (
    Envelope,
    Signer,
    Trust,
    accept,
    parse,
    reclaim,
    seal,
    verify_run,
)
from edgeos.agents.migration.envelope import sign
from edgeos.agents.retention import apply_retention
from edgeos.connectors import DeliveryWorker
from edgeos.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    VerificationError,
)
from edgeos.fleet.db import current_revision, device_revision
from edgeos.security import (
    CertificateAuthority,
    certificate_info,
    generate_key,
    load_private_key,
    make_csr,
    write_private_key,
    write_public_file,
)
from edgeos.state import Database, journal, outbox
from edgeos.state.writer import GroupWriter
from edgeos.sync import run_relay
from edgeos.sync.enroll import enroll
from edgeos.sync.identity import FleetPaths, Identity, load_identity, save_identity
from edgeos.sync.run_relay import RunInbox
from tests.fleet_support import INVENTORY, FleetServer, fleet_config, join_token, wait_for
from tests.test_connectors import Receiver
from tests.test_delivery import supplier

STEPS = """
import pathlib, time

def _gate(data, name):
    # Waits until the test opens the gate, so a test can move the run at a known step.
    gates = pathlib.Path(data["gates"])
    (gates / f"{name}.waiting").touch()
    deadline = time.monotonic() + 10
    while not (gates / name).exists() and time.monotonic() < deadline:
        time.sleep(0.01)

def sense(ctx, data):
    _gate(data, "sense")
    ctx.context["seen"] = ["sense"]
    ctx.effect("supplier.orders", {"sku": "S", "qty": 1})
    return {**data, "done": ["sense"]}

def _act(ctx, data, name):
    ctx.context["seen"] = ctx.context.get("seen", []) + [name]
    ctx.effect("supplier.orders", {"sku": name, "qty": len(data["done"])})
    return {**data, "done": data["done"] + [name]}

def act1(ctx, data):
    return _act(ctx, data, "act1")

def act2(ctx, data):
    _gate(data, "act2")
    return _act(ctx, data, "act2")

def act3(ctx, data):
    return _act(ctx, data, "act3")

def act4(ctx, data):
    return _act(ctx, data, "act4")

def learn(ctx, data):
    return {"done": data["done"], "seen": ctx.context.get("seen")}
"""
STEP_NAMES = ["sense", "act1", "act2", "act3", "act4", "learn"]


@dataclass
class Node:
    """A node database with its device identity, as the fleet CA issued it."""

    name: str
    db: Database
    root: Path
    signer: Signer
    trust: Trust


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def identity(ca: CertificateAuthority, device_id: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = generate_key()
    issued = ca.issue_device(make_csr(key, device_id), device_id=device_id, group="stores")
    return key, issued.pem


def bundle(root: Path, version: str = "1.0") -> Path:
    directory = root / f"bundle-{version}"
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": "restock",
        "version": version,
        "steps": STEP_NAMES,
        "connectors": ["supplier"],
        "retry": {"max_attempts": 1},
    }
    (directory / "agent.yaml").write_text(yaml.safe_dump(manifest))
    (directory / "agent.py").write_text(textwrap.dedent(STEPS))
    return directory


@pytest.fixture
def nodes(tmp_path: Path, ca: CertificateAuthority) -> Iterator[dict[str, Node]]:
    made: dict[str, Node] = {}
    try:
        for name in ("edge-0001", "cloud-001", "other-001"):
            root = tmp_path / name
            db = Database(root / "node.db").open()
            key, pem = identity(ca, name)
            made[name] = Node(name, db, root, Signer(name, key, pem), Trust(name, ca.cert_pem))
        yield made
    finally:
        for node in made.values():
            node.db.close()


def install(node: Node, source: Path) -> None:
    manage.add_agent(node.db, source, node.root / "agents", models=[], connectors=["supplier"])


@asynccontextmanager
async def running(node: Node, receiver: Receiver | None) -> AsyncIterator[Executor]:
    """The node's executor and, with a receiver, its delivery worker."""
    writer = GroupWriter(node.db).start()
    connectors = {} if receiver is None else {"supplier": supplier(receiver)}
    worker = DeliveryWorker(
        node.db, connectors, base_delay=0.01, max_delay=0.05, poll_interval=0.05
    )
    executor = Executor(node.db, writer, scan_interval=0.05, on_effects=worker.wake)
    if receiver is not None:
        worker.start()
    await executor.start()
    try:
        yield executor
    finally:
        await executor.stop()
        await worker.stop()
        for connector in connectors.values():
            await connector.close()
        writer.stop()


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def park_after_gate(node: Node, gates: Path, gate: str) -> None:
    """Pause the agent while the run waits at ``gate``: it parks after that step."""
    await until(lambda: (gates / f"{gate}.waiting").exists())
    manage.set_paused(node.db, "restock", True)
    await asyncio.sleep(0.15)  # the executor reads the paused flag at most every 100 ms
    (gates / gate).touch()


def state(node: Node, run_id: str) -> str:
    return store.run(node.db, run_id).state


def steps_done(node: Node, run_id: str) -> list[str]:
    return [r.step or "" for r in journal.for_run(node.db, run_id) if r.kind == "step_completed"]


def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row a migration may write, to show a refusal changed nothing."""
    tables = ("runs", "journal", "outbox", "run_context", "run_turns", "run_envelopes")
    reader = db.reader()
    return {t: sorted(reader.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def test_a_run_moved_edge_cloud_edge_finishes_with_each_effect_once(
    nodes: dict[str, Node], tmp_path: Path
) -> None:
    edge, cloud = nodes["edge-0001"], nodes["cloud-001"]
    source = bundle(tmp_path)
    install(edge, source)
    install(cloud, source)
    gates = tmp_path / "gates"
    gates.mkdir()
    receiver = Receiver()

    async def go() -> str:
        # On the edge: the run senses, its effect is delivered, then it moves to the cloud.
        async with running(edge, receiver) as ex:
            run_id = await ex.submit("restock", data={"gates": str(gates)})
            await park_after_gate(edge, gates, "sense")
            await until(lambda: state(edge, run_id) == "paused")
            await until(lambda: outbox.counts(edge.db)["delivered"] == 1)
            there = seal(edge.db, run_id, signer=edge.signer, destination=cloud.name)
        assert state(edge, run_id) == "migrated"
        # On the cloud node, without a delivery worker: act1 and act2 decide effects that
        # are still pending when the run is sealed back.
        async with running(cloud, None) as ex:
            arrived = accept(cloud.db, parse(there.to_bytes()), trust=cloud.trust)
            assert (arrived.run_id, arrived.returned) == (run_id, False)
            ex.nudge()
            await park_after_gate(cloud, gates, "act2")
            await until(lambda: state(cloud, run_id) == "paused")
            back = seal(cloud.db, run_id, signer=cloud.signer, destination=edge.name)
        assert [e.key for e in back.effects] == [f"{run_id}:1:0", f"{run_id}:2:0"]
        assert {e.state for e in outbox.for_run(cloud.db, run_id)} == {"handed_over"}
        idle = DeliveryWorker(cloud.db, {"supplier": supplier(receiver)})
        assert await idle.drain_once() == 0  # handed over: never delivered by the cloud node
        await idle.connectors["supplier"].close()
        # Home again: the edge continues at act3 and delivers the handed-over effects.
        manage.set_paused(edge.db, "restock", False)
        async with running(edge, receiver) as ex:
            home = accept(edge.db, parse(back.to_bytes()), trust=edge.trust)
            assert home.returned
            ex.nudge()
            run = await ex.wait(run_id)
            assert run.state == "succeeded", run.error
            assert run.outcome == {"done": STEP_NAMES[:-1], "seen": STEP_NAMES[:-1]}
            await until(lambda: outbox.counts(edge.db)["delivered"] == 5)
        return run_id

    try:
        run_id = asyncio.run(go())
        with receiver.lock:
            keys = [r.headers.get("Idempotency-Key", "") for r in receiver.requests]
    finally:
        receiver.stop()
    expected = [f"{run_id}:{i}:0" for i in range(5)]
    assert sorted(keys) == expected  # each effect sent once, with the key it was decided with
    assert steps_done(cloud, run_id) == ["sense", "act1", "act2"]
    assert steps_done(edge, run_id) == STEP_NAMES  # each step ran once, across two nodes
    home_check = verify_run(edge.db, run_id, ca_pem=edge.trust.ca_pem)
    assert home_check.ok, home_check.reason
    assert home_check.hops == (edge.name, cloud.name)
    assert verify_run(cloud.db, run_id, ca_pem=cloud.trust.ca_pem).ok
    assert journal.verify(edge.db).ok
    assert journal.verify(cloud.db).ok
    kinds = [r.kind for r in journal.for_run(edge.db, run_id)]
    assert kinds.count("migrated_out") == 2
    assert kinds.count("migrated_in") == 2
    assert kinds.count("effect_delivered") == 5
    # The cloud's copy of the run ends where it left; the edge's continues from it.
    away = journal.for_run(cloud.db, run_id)
    assert [r.payload for r in away] == [r.payload for r in journal.for_run(edge.db, run_id)][
        : len(away)
    ]


def test_a_step_in_flight_when_sealed_is_dropped_here_and_run_there(
    nodes: dict[str, Node], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    edge, cloud = nodes["edge-0001"], nodes["cloud-001"]
    source = bundle(tmp_path)
    install(edge, source)
    install(cloud, source)
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "act2").touch()

    async def go() -> str:
        async with running(edge, None) as ex:
            run_id = await ex.submit("restock", data={"gates": str(gates)})
            await until(lambda: (gates / "sense.waiting").exists())
            envelope = seal(edge.db, run_id, signer=edge.signer, destination=cloud.name)
            (gates / "sense").touch()  # the step finishes after the seal: its result is dropped
            await until(lambda: "its result is dropped" in caplog.text)
        async with running(cloud, None) as ex:
            accept(cloud.db, envelope, trust=cloud.trust)
            ex.nudge()
            run = await ex.wait(run_id)
            assert run.state == "succeeded", run.error
        return run_id

    with caplog.at_level("INFO", logger="edgeos.agents"):
        run_id = asyncio.run(go())
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.kind for r in journal.for_run(edge.db, run_id)] == ["run_started", "migrated_out"]
    assert outbox.for_run(edge.db, run_id) == []
    assert steps_done(cloud, run_id) == STEP_NAMES
    assert len(outbox.for_run(cloud.db, run_id)) == 5
    assert verify_run(cloud.db, run_id).ok


# -- one sealed run for the refusals ------------------------------------------------------
def started_run(node: Node) -> str:
    """A run that decided one effect at its first step, as the executor commits it."""
    agent = store.agent(node.db, "restock")
    with node.db.transaction() as conn:
        run_id = create_run(
            conn,
            agent=agent,
            trigger="manual",
            data={"gates": "."},
            at=time.time(),
            state="running",
        )
        key = f"{run_id}:0:0"
        outbox.enqueue(
            conn, outbox.OutboxEntry(key, run_id, "supplier", "orders", {"qty": 1}), at=time.time()
        )
        journal.append(conn, run_id, "effect_enqueued", {"key": key}, step="sense", at=time.time())
        conn.execute(
            "UPDATE runs SET next_step = 'act1', step_count = 1, carry = ? WHERE id = ?",
            (json.dumps({"gates": ".", "done": ["sense"]}), run_id),
        )
        conn.execute(
            "INSERT INTO run_context (run_id, key, value) VALUES (?, 'seen', '[\"sense\"]')",
            (run_id,),
        )
        # A person answered a question of the next step: the step asks again, wherever it runs.
        conn.execute(
            "INSERT INTO escalations (id, run_id, step, question, options, default_choice, "
            "deadline, state, answer, answered_by) VALUES (?, ?, 'act1', 'order?', "
            "'[\"yes\", \"no\"]', '\"no\"', 0, 'answered', '\"yes\"', 'ana')",
            (f"{run_id}:1:0", run_id),
        )
    return run_id


@pytest.fixture
def sealed(nodes: dict[str, Node], tmp_path: Path) -> tuple[str, Envelope]:
    source = bundle(tmp_path)
    install(nodes["edge-0001"], source)
    install(nodes["cloud-001"], source)
    run_id = started_run(nodes["edge-0001"])
    envelope = seal(
        nodes["edge-0001"].db, run_id, signer=nodes["edge-0001"].signer, destination="cloud-001"
    )
    return run_id, envelope


def edited(envelope: Envelope, change: Any) -> Envelope:
    doc = envelope.model_dump(mode="json")
    change(doc)
    return parse(json.dumps(doc))


def refused(node: Node, envelope: Envelope, error: type[Exception], match: str, **kw: Any) -> None:
    before = snapshot(node.db)
    with pytest.raises(error, match=match):
        accept(node.db, envelope, trust=kw.pop("trust", node.trust), **kw)
    assert snapshot(node.db) == before


def test_an_accepted_run_is_resumable_with_its_context_and_effects(
    nodes: dict[str, Node], sealed: tuple[str, Envelope]
) -> None:
    run_id, envelope = sealed
    edge, cloud = nodes["edge-0001"], nodes["cloud-001"]
    handed = outbox.get(edge.db, f"{run_id}:0:0")
    assert handed is not None
    assert handed.state == "handed_over"
    assert edge.db.reader().execute("SELECT count(*) FROM run_context").fetchone()[0] == 0
    accept(cloud.db, envelope, trust=cloud.trust)
    run = store.run(cloud.db, run_id)
    assert (run.state, run.next_step, run.step_count) == ("pending", "act1", 1)
    assert run_id in store.active_run_ids(cloud.db)  # the executor picks it up
    effect = outbox.get(cloud.db, f"{run_id}:0:0")
    assert effect is not None
    assert (effect.state, effect.payload) == ("pending", {"qty": 1})
    context = cloud.db.reader().execute("SELECT key, value FROM run_context").fetchall()
    assert context == [("seen", '["sense"]')]
    assert store.answers_for(cloud.db, run_id) == {f"{run_id}:1:0": "yes"}
    assert verify_run(cloud.db, run_id).ok


def test_tampered_forged_replayed_expired_or_misdirected_envelopes_change_nothing(
    nodes: dict[str, Node], sealed: tuple[str, Envelope], ca: CertificateAuthority
) -> None:
    envelope = sealed[1]
    cloud, edge = nodes["cloud-001"], nodes["edge-0001"]

    def record(doc: dict[str, Any]) -> None:
        doc["records"][0]["payload"]["input"] = {"gates": "/elsewhere"}

    refused(cloud, edited(envelope, record), VerificationError, r"record 0 \(run_started\)")

    def effect(doc: dict[str, Any]) -> None:
        doc["effects"][0]["payload"]["qty"] = 100

    refused(cloud, edited(envelope, effect), VerificationError, "effects part does not match")

    def dropped(doc: dict[str, Any]) -> None:
        doc["records"].pop(1)

    refused(cloud, edited(envelope, dropped), VerificationError, "record 1")
    # Signed by another key with the edge's certificate: forged.
    stranger = generate_key()
    forged = envelope.model_copy(update={"signature": sign(envelope.statement, stranger)})
    refused(cloud, forged, VerificationError, "signature does not verify")
    # A certificate for the edge's id from a CA this fleet does not trust.
    rogue = CertificateAuthority.create("rogue CA")
    key, pem = identity(rogue, edge.name)
    foreign = envelope.model_copy(
        update={"certificate": pem, "signature": sign(envelope.statement, key)}
    )
    refused(cloud, foreign, AuthenticationError, "not issued by this fleet's CA")
    # The statement edited (sent to another device): its signature no longer holds.
    redirected = edited(envelope, lambda d: d["statement"].update(destination="other-001"))
    refused(nodes["other-001"], redirected, VerificationError, "signature does not verify")
    refused(nodes["other-001"], envelope, PermissionDeniedError, "sealed for device 'cloud-001'")
    revoked = Trust(cloud.name, cloud.trust.ca_pem, revoked=frozenset({edge.name}))
    refused(cloud, envelope, AuthenticationError, "is revoked", trust=revoked)
    late = envelope.statement.expires_at + 1
    refused(cloud, envelope, VerificationError, "expired 1 s ago", now=late)
    with pytest.raises(VerificationError, match=r"not a run envelope: field 'statement\.format'"):
        parse(b'{"statement": {}}')

    accept(cloud.db, envelope, trust=cloud.trust)
    refused(cloud, envelope, ConflictError, "already accepted here: a replay is refused")


def test_unknown_agent_or_version_and_an_active_run_are_refused(
    nodes: dict[str, Node], sealed: tuple[str, Envelope], tmp_path: Path
) -> None:
    run_id, envelope = sealed
    edge, cloud, other = nodes["edge-0001"], nodes["cloud-001"], nodes["other-001"]
    with pytest.raises(ConflictError, match="already migrated"):
        seal(edge.db, run_id, signer=edge.signer, destination=other.name)
    # other-001 has no agent, then another version of it.
    resigned = seal(edge.db, started_run(edge), signer=edge.signer, destination=other.name)
    refused(other, resigned, NotFoundError, "needs agent restock 1.0, which is not installed")
    install(other, bundle(tmp_path / "v2", version="2.0"))
    refused(other, resigned, ConflictError, "this node has 2.0 with another bundle")
    # A run with that id is active on the cloud node already.
    with cloud.db.transaction() as conn:
        conn.execute(
            "INSERT INTO runs (id, agent, agent_version, trigger, input, state, next_step, "
            "step_count, carry, seed, created_at, updated_at) "
            "VALUES (?, 'restock', '1.0', 'manual', '{}', 'running', 'act1', 1, '{}', 1, 0, 0)",
            (run_id,),
        )
    refused(cloud, envelope, ConflictError, "is already here \\(running\\)")


def test_an_import_is_one_transaction(nodes: dict[str, Node], sealed: tuple[str, Envelope]) -> None:
    """A failure at the import's last write (an effect key already delivered here) leaves
    none of the rows written before it: a kill at any point leaves nothing or everything."""
    run_id, envelope = sealed
    cloud = nodes["cloud-001"]
    with cloud.db.transaction() as conn:
        conn.execute(
            "INSERT INTO outbox (key, run_id, connector, operation, payload, state, "
            "next_attempt_at, created_at) VALUES (?, ?, 'supplier', 'orders', '{}', "
            "'delivered', 0, 0)",
            (f"{run_id}:0:0", run_id),
        )
    refused(cloud, envelope, ConflictError, "already here and not handed over")


def test_a_migrated_run_is_frozen_on_its_source(
    nodes: dict[str, Node], sealed: tuple[str, Envelope]
) -> None:
    run_id, _ = sealed
    edge = nodes["edge-0001"]
    before = snapshot(edge.db)
    with (  # a step that was in flight, failing late
        pytest.raises(sqlite3.IntegrityError, match="migrated to another node"),
        edge.db.transaction() as conn,
    ):
        journal.append(conn, run_id, "step_failed", {}, step="act1", at=time.time())
    with (
        pytest.raises(ConflictError, match="continues on another node"),
        edge.db.transaction() as conn,
    ):
        cancel_run(conn, run_id=run_id, by="operator", at=time.time())
    assert snapshot(edge.db) == before
    assert run_id not in store.active_run_ids(edge.db)


def test_seal_refuses_a_run_waiting_for_a_person_and_changes_nothing(
    nodes: dict[str, Node], tmp_path: Path
) -> None:
    edge = nodes["edge-0001"]
    install(edge, bundle(tmp_path))
    run_id = started_run(edge)
    with edge.db.transaction() as conn:
        conn.execute("UPDATE runs SET state = 'waiting_human' WHERE id = ?", (run_id,))
    before = snapshot(edge.db)
    with pytest.raises(ConflictError, match="waits for an answer"):
        seal(edge.db, run_id, signer=edge.signer, destination="cloud-001")
    assert snapshot(edge.db) == before


def test_a_run_whose_envelope_expired_unaccepted_is_taken_back(
    nodes: dict[str, Node], tmp_path: Path
) -> None:
    edge, cloud = nodes["edge-0001"], nodes["cloud-001"]
    install(edge, bundle(tmp_path))
    install(cloud, bundle(tmp_path))
    run_id = started_run(edge)
    envelope = seal(edge.db, run_id, signer=edge.signer, destination=cloud.name, ttl=60)
    before = snapshot(edge.db)
    with pytest.raises(ConflictError, match="may still be accepted by device cloud-001"):
        reclaim(edge.db, run_id, now=envelope.statement.expires_at)
    assert snapshot(edge.db) == before
    later = envelope.statement.expires_at + 301  # past the margin for the other clock
    reclaim(edge.db, run_id, now=later)
    run = store.run(edge.db, run_id)
    assert (run.state, run.next_step, run.step_count) == ("pending", "act1", 1)
    effect = outbox.get(edge.db, f"{run_id}:0:0")
    assert effect is not None
    assert effect.state == "pending"  # its own handed-over effect, back in delivery
    context = edge.db.reader().execute("SELECT key, value FROM run_context").fetchall()
    assert context == [("seen", '["sense"]')]
    assert verify_run(edge.db, run_id, ca_pem=edge.trust.ca_pem).ok
    refused(cloud, envelope, VerificationError, "expired", now=later)
    with pytest.raises(NotFoundError, match="no envelope sealed here that is not spent"):
        reclaim(edge.db, run_id, now=later)


def test_retention_removes_a_run_that_left_long_ago(
    nodes: dict[str, Node], sealed: tuple[str, Envelope]
) -> None:
    run_id, envelope = sealed
    edge = nodes["edge-0001"]
    later = envelope.statement.created_at + 31 * 86400  # past the default 30 days
    done = apply_retention(edge.db, now=later)
    assert done.runs == 1
    assert journal.for_run(edge.db, run_id) == []
    assert journal.verify(edge.db).ok
    kept = edge.db.reader().execute("SELECT id, body FROM run_envelopes").fetchall()
    assert kept == [(envelope.statement.envelope_id, None)]  # the id still refuses a replay


def test_verify_run_names_a_record_rewritten_with_its_node_hash(
    nodes: dict[str, Node], sealed: tuple[str, Envelope]
) -> None:
    """Rewriting an imported record and its node hash escapes the record's own check, not
    the head the sending device signed."""
    run_id, envelope = sealed
    cloud = nodes["cloud-001"]
    accept(cloud.db, envelope, trust=cloud.trust)
    first = journal.for_run(cloud.db, run_id)[0]
    payload = {**first.payload, "input": {"gates": "/elsewhere"}}
    body = journal.canonical(payload)
    rehashed = journal.record_hash(first.prev_hash, run_id, first.kind, first.step, first.at, body)
    with cloud.db.transaction() as conn:
        conn.execute(
            "UPDATE journal SET payload = ?, hash = ? WHERE seq = ?",
            (body.decode(), rehashed, first.seq),
        )
    check = verify_run(cloud.db, run_id)
    migrated_in = next(r for r in journal.for_run(cloud.db, run_id) if r.kind == "migrated_in")
    assert not check.ok
    assert check.first_bad_seq == migrated_in.seq
    assert "do not end at the head device 'edge-0001' signed" in (check.reason or "")


# -- by file, through the command line -------------------------------------------------------
def enroll_files(node: Node, ca: CertificateAuthority) -> None:
    """The fleet identity files enrollment leaves in a node's data directory."""
    paths = FleetPaths.of(node.root)
    write_private_key(paths.key, node.signer.key)
    write_public_file(paths.cert, node.signer.certificate_pem)
    write_public_file(paths.ca, ca.cert_pem)
    info = certificate_info(node.signer.certificate_pem)
    save_identity(
        node.root,
        Identity("https://fleet.invalid", node.name, "stores", time.time(), info.not_before,
                 info.not_after),
    )  # fmt: skip


def test_runs_move_by_file_with_the_cli(
    nodes: dict[str, Node], tmp_path: Path, ca: CertificateAuthority
) -> None:
    from typer.testing import CliRunner

    from edgeos.cli.main import app

    edge, cloud = nodes["edge-0001"], nodes["cloud-001"]
    source = bundle(tmp_path)
    for node in (edge, cloud):
        install(node, source)
        enroll_files(node, ca)
    run_id = started_run(edge)
    runner = CliRunner()
    envelope = tmp_path / "run.envelope"

    def edgeos(node: Node, *args: str) -> Any:
        return runner.invoke(app, [*args, "--data-dir", str(node.root)], env={"COLUMNS": "200"})

    sealed = edgeos(edge, "runs", "migrate", run_id, "--to", cloud.name, "--out", str(envelope))
    assert sealed.exit_code == 0, sealed.output
    assert f"run {run_id} sealed for device cloud-001" in sealed.output
    tampered = tmp_path / "tampered.envelope"
    doc = json.loads(envelope.read_bytes())
    doc["run"]["carry"]["done"] = []
    tampered.write_text(json.dumps(doc))
    refused = edgeos(cloud, "runs", "accept", str(tampered))
    assert isinstance(refused.exception, VerificationError)
    assert "its run part does not match the signed digest" in str(refused.exception)
    accepted = edgeos(cloud, "runs", "accept", str(envelope))
    assert accepted.exit_code == 0, accepted.output
    assert "continues at step act1, 1 effect(s) to deliver" in accepted.output
    verified = edgeos(cloud, "runs", "verify", run_id)
    assert verified.exit_code == 0, verified.output
    assert "records verified via edge-0001" in verified.output
    with cloud.db.transaction() as conn:
        conn.execute(
            "UPDATE journal SET payload = '{}' WHERE run_id = ? AND kind = 'run_started'", (run_id,)
        )
    broken = edgeos(cloud, "runs", "verify", run_id)
    assert broken.exit_code == 1
    assert "its content does not match its hash" in broken.output


def test_an_accept_killed_at_any_moment_takes_the_run_whole_or_not_at_all(
    nodes: dict[str, Node], tmp_path: Path, ca: CertificateAuthority
) -> None:
    """``edgeos runs accept`` SIGKILLed again and again, earlier and later: after each
    kill the run is on the node with its whole journal and its effects once, or not at
    all; accepting again then finishes the job or says it is done."""
    import signal
    import subprocess
    import sys

    edge, cloud = nodes["edge-0001"], nodes["cloud-001"]
    source = bundle(tmp_path)
    for node in (edge, cloud):
        install(node, source)
        enroll_files(node, ca)
    run_id = started_run(edge)
    envelope = seal(edge.db, run_id, signer=edge.signer, destination=cloud.name)
    path = tmp_path / "run.envelope"
    path.write_bytes(envelope.to_bytes())
    command = [sys.executable, "-m", "edgeos", "runs", "accept", str(path),
               "--data-dir", str(cloud.root)]  # fmt: skip
    expected = len(journal.for_run(edge.db, run_id))

    def consistent() -> bool:
        """Whether the run is here (checked whole); False when it is not at all."""
        records = journal.for_run(cloud.db, run_id)
        effects = outbox.for_run(cloud.db, run_id)
        if not [r for r in store.runs(cloud.db) if r.id == run_id]:
            assert (records, effects) == ([], [])
            return False
        assert len(records) == expected + 1  # and its migrated_in record
        assert len(effects) == len(envelope.effects)
        assert journal.verify(cloud.db).ok
        return True

    for delay in (0.05, 0.2, 0.4, 0.6, 0.8, 1.0, 1.3, 1.6):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        if consistent():
            break
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0 or "was already accepted here" in again.stderr, again.stderr
    assert consistent()


# -- through the fleet's relay ---------------------------------------------------------------
def enrolled_node(fleet: FleetServer, root: Path, source: Path) -> Node:
    """A node enrolled in a real fleet as ``edgeos node run --fleet`` does it."""
    identity = enroll(root, fleet.url, join_token(fleet), INVENTORY)
    paths = FleetPaths.of(root)
    signer = Signer(identity.device_id, load_private_key(paths.key), paths.cert.read_text())
    node = Node(
        identity.device_id, Database(root / "node.db").open(), root, signer,
        Trust(identity.device_id, paths.ca.read_text()),
    )  # fmt: skip
    install(node, source)
    return node


def test_runs_are_relayed_through_the_fleet_between_its_devices(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    fleet = running_fleet
    source = bundle(tmp_path)
    edge = enrolled_node(fleet, tmp_path / "edge", source)
    cloud = enrolled_node(fleet, tmp_path / "cloud", source)
    third = enrolled_node(fleet, tmp_path / "third", source)

    def send(node: Node, envelope: Envelope) -> None:
        asyncio.run(run_relay.send_from(node.root, envelope))

    def revisions() -> tuple[int, int, int]:
        """The fleet's revision, the destination's, the third device's."""
        with fleet.db.read() as conn:
            return (current_revision(conn), device_revision(conn, cloud.name),
                    device_revision(conn, third.name))  # fmt: skip

    async def inbox(node: Node, moved: bool) -> list[tuple[str, str]]:
        client, url, _ = run_relay.device_client(node.root)
        async with client:
            taken = await RunInbox(node.db, node.root).after_sync(
                client, url, node.name, moved=moved
            )
        return [(a.run_id, a.source) for a in taken]

    try:
        run_id = started_run(edge)
        envelope = seal(edge.db, run_id, signer=edge.signer, destination=cloud.name)
        # Only the device that sealed it may relay it: the third device cannot.
        with pytest.raises(PermissionDeniedError, match="relays only the runs it sealed"):
            send(third, envelope)
        fleet_before, cloud_before, third_before = revisions()
        send(edge, envelope)
        # The destination's long poll wakes, and no other device's.
        assert revisions() == (fleet_before, cloud_before + 1, third_before)
        with pytest.raises(ConflictError, match="relayed already"):
            send(edge, envelope)
        assert asyncio.run(inbox(third, moved=True)) == []  # not for it
        assert asyncio.run(inbox(cloud, moved=True)) == [(run_id, edge.name)]
        assert store.run(cloud.db, run_id).state == "pending"
        assert asyncio.run(run_relay.receive_at(cloud.db, cloud.root)) == []  # acknowledged
        # A revoked device relays nothing, and nothing is relayed to one.
        back = seal(cloud.db, run_id, signer=cloud.signer, destination=edge.name)
        with fleet.client() as admin:
            admin.revoke_device(edge.name)
        with pytest.raises(PermissionDeniedError, match="is revoked: it cannot take over"):
            send(cloud, back)
        other = seal(edge.db, started_run(edge), signer=edge.signer, destination=cloud.name)
        with pytest.raises(AuthenticationError):
            send(edge, other)
    finally:
        for node in (edge, cloud, third):
            node.db.close()


def test_a_run_sealed_by_a_device_the_fleet_revoked_is_refused_even_as_a_file(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    # The fleet refuses a revoked device's envelopes at its door; one carried by hand
    # must meet the same refusal at the node, from the list the node fetched.
    from typer.testing import CliRunner

    from edgeos.cli.main import app

    fleet = running_fleet
    source = bundle(tmp_path)
    edge = enrolled_node(fleet, tmp_path / "edge", source)
    cloud = enrolled_node(fleet, tmp_path / "cloud", source)
    try:
        envelope = tmp_path / "run.envelope"
        envelope.write_bytes(
            seal(edge.db, started_run(edge), signer=edge.signer, destination=cloud.name).to_bytes()
        )
        with fleet.client() as admin:
            admin.revoke_device(edge.name)

        async def sync_inbox() -> None:
            client, url, _ = run_relay.device_client(cloud.root)
            async with client:
                await RunInbox(cloud.db, cloud.root).after_sync(client, url, cloud.name, moved=True)

        asyncio.run(sync_inbox())
        kept = json.loads(FleetPaths.of(cloud.root).revoked.read_text())
        assert kept["devices"] == [edge.name]
        serial = certificate_info(FleetPaths.of(edge.root).cert.read_text()).serial
        assert serial in kept["serials"]
        refused = CliRunner().invoke(
            app, ["runs", "accept", str(envelope), "--data-dir", str(cloud.root)]
        )
        assert isinstance(refused.exception, AuthenticationError), refused.output
        assert "is revoked" in str(refused.exception)
        assert store.runs(cloud.db) == []
        # A damaged list refuses everything, with what to do, rather than nothing.
        FleetPaths.of(cloud.root).revoked.write_text("{")
        damaged = CliRunner().invoke(
            app, ["runs", "accept", str(envelope), "--data-dir", str(cloud.root)]
        )
        assert isinstance(damaged.exception, ConfigError)
        assert "delete it, and the node fetches it again" in str(damaged.exception)
    finally:
        for node in (edge, cloud):
            node.db.close()


def test_a_real_node_takes_over_a_relayed_run_at_its_sync_and_finishes_it(
    tmp_path: Path,
) -> None:
    """The cloud node is a real ``edgeos node run`` enrolled in a real fleet: its sync loop
    fetches the run the edge sealed for it, its executor finishes it, and its delivery
    worker delivers the effect the edge handed over, with the edge's key."""
    from edgeos.node.process import node_process

    receiver = Receiver()
    fleet = FleetServer(
        fleet_config(tmp_path / "fleet", f"sqlite:///{tmp_path / 'fleet.db'}", sync_interval_s=1.0)
    ).start()
    try:
        source = bundle(tmp_path)
        edge = enrolled_node(fleet, tmp_path / "edge", source)
        cloud_dir = tmp_path / "cloud"
        cloud_dir.mkdir()
        (cloud_dir / "connectors.yaml").write_text(
            f"supplier:\n  type: http\n  base_url: {receiver.url}\n"
            "  operations:\n    orders: {method: POST, path: /orders}\n"
        )
        with Database(cloud_dir / "node.db") as db:
            manage.add_agent(db, source, cloud_dir / "agents", models=[], connectors=["supplier"])
        node = node_process(cloud_dir, EDGEOS_JOIN_TOKEN=join_token(fleet))
        node.command += ["--fleet", fleet.url]
        with node:
            cloud_id = wait_for("the node to enroll", lambda: load_identity(cloud_dir)).device_id
            run_id = started_run(edge)
            (tmp_path / "gates").mkdir()
            with edge.db.transaction() as conn:  # every gate open: the run goes straight on
                conn.execute(
                    "UPDATE runs SET carry = ? WHERE id = ?",
                    (json.dumps({"gates": str(tmp_path / "gates"), "done": ["sense"]}), run_id),
                )
            for gate in ("sense", "act2"):
                (tmp_path / "gates" / gate).touch()
            envelope = seal(edge.db, run_id, signer=edge.signer, destination=cloud_id)
            asyncio.run(run_relay.send_from(edge.root, envelope))

            def finished() -> Any:
                doc = httpx.get(f"{node.url}/api/runs/{run_id}", headers=node.headers, timeout=10)
                return doc.status_code == 200 and doc.json()["state"] == "succeeded" and doc.json()

            run = wait_for("the cloud node to finish the relayed run", finished)
            wait_for("its five effects", lambda: len(receiver.applied) == 5)
        kinds = [r["kind"] for r in run["journal"]]
        assert kinds.count("migrated_in") == 1
        with receiver.lock:
            keys = sorted(r.headers.get("Idempotency-Key", "") for r in receiver.requests)
        assert keys == [f"{run_id}:{i}:0" for i in range(5)]
        with Database(cloud_dir / "node.db") as db:
            assert verify_run(db, run_id, ca_pem=fleet.ca_pem).ok
        edge.db.close()
    finally:
        fleet.stop()
        receiver.stop()
