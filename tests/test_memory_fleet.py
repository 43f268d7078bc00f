"""Long-term memory replicated to a real fleet over mTLS, on SQLite and PostgreSQL.

Replication ships everything once and resumes after the fleet stopped or an answer was
lost, with neither duplicates nor gaps; an erasure on the node reaches the backup; a
device reads and writes its own backup only; malformed and oversized batches are refused
without harm; and a device enrolled as another's replacement restores its memory, which
recall then finds by meaning.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from edgeos.agents import manage
from edgeos.errors import (
    AuthenticationError,
    ConfigError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from edgeos.fleet import memory_backups, tables
from edgeos.memory import replication
from edgeos.memory.handle import AgentMemory
from edgeos.node.process import node_process
from edgeos.protocol.fleet import MAX_MEMORY_BATCH_BYTES
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.settings import load_settings
from edgeos.state import Database
from edgeos.sync import state
from edgeos.sync.client import fleet_client
from edgeos.sync.enroll import enroll
from edgeos.sync.identity import FleetPaths, Identity
from edgeos.sync.memory_target import RESTORED, FleetTarget, MemoryReplicator
from tests.fleet_support import (
    INVENTORY,
    Device,
    FleetServer,
    audit_rows,
    enroll_device,
    fleet_config,
    join_token,
    table_snapshot,
)
from tests.memory_support import make_bundle, register
from tests.test_memory_replication import CONFIG, fill, live, log_seqs

# -- helpers ------------------------------------------------------------------------------


def node(fleet: FleetServer, data: Path, token: str | None = None) -> Identity:
    """A node's data directory enrolled the way a node enrolls (its own key, a CSR)."""
    return enroll(data, fleet.url, token or join_token(fleet), INVENTORY)


def replicator(
    fleet: FleetServer, db: Database, data: Path, identity: Identity
) -> MemoryReplicator:
    return MemoryReplicator(db, data, lambda: identity, lambda _: fleet.url, interval_s=0.1)


def device_client(fleet: FleetServer, data: Path) -> httpx.Client:
    """The node's own mTLS client of the fleet, from its enrolled identity."""
    paths = FleetPaths.of(data)
    return fleet_client(fleet.url, fleet.ca_pem, cert=paths.cert, key=paths.key)


def backup(fleet: FleetServer, device_id: str) -> dict[str, Any]:
    """The device's backup as an operator with the read scope sees it."""
    with fleet.client() as client:
        read = client.create_token("reader", ["read"])["token"]
    with fleet.client(read) as client:
        doc: dict[str, Any] = client.request("GET", f"/api/v1/devices/{device_id}/memory")
    return doc


def stored_bodies(fleet: FleetServer, device_id: str) -> dict[str, str]:
    r = tables.memory_backup_records
    with fleet.db.read() as conn:
        rows = conn.execute(sa.select(r.c.record, r.c.body).where(r.c.device_id == device_id))
        return {row.record: row.body for row in rows}


# -- replication ----------------------------------------------------------------------------


def test_memory_replicates_once_and_an_erasure_reaches_the_fleet(
    running_fleet: FleetServer, db: Database, host: ModelHost, tmp_path: Path
) -> None:
    identity = node(running_fleet, tmp_path / "a")
    me = identity.device_id
    fill(db, host, 5, subject="alice-SECRET")
    keep = fill(db, host, 25, subject="bob")
    memory = replicator(running_fleet, db, tmp_path / "a", identity)

    done = memory.replicate(identity)
    assert done is not None
    assert (done.shipped, done.position) == (30, log_seqs(db)[-1])
    shown = backup(running_fleet, me)
    assert (shown["position"], shown["records"], shown["changes"]) == (log_seqs(db)[-1], 30, 30)
    assert shown["bytes"] > 30 * 100
    assert shown["replaces"] is None
    assert memory.replicate(identity) is None  # nothing new: the fleet is not even asked

    m = AgentMemory(db, host, "notes", CONFIG)
    m.forget(subject="alice-SECRET")
    m.commit()
    done = memory.replicate(identity)
    assert done is not None
    assert done.shipped == 5
    bodies = stored_bodies(running_fleet, me)
    assert sorted(bodies) == sorted(keep)
    assert not any("alice-SECRET" in body for body in bodies.values())
    for record, body in bodies.items():  # each as the node holds it, vector and all
        text, vector = live(db)[record]
        assert orjson.loads(body)["text"] == text
        assert base64.b64decode(orjson.loads(body)["vector"]) == vector
    assert backup(running_fleet, me)["records"] == 25


def test_batches_are_split_to_fit_the_fleets_limits(
    running_fleet: FleetServer, db: Database, host: ModelHost, tmp_path: Path
) -> None:
    me = node(running_fleet, tmp_path / "a").device_id
    fill(db, host, 30)
    sizes: list[int] = []
    with device_client(running_fleet, tmp_path / "a") as http:
        http.event_hooks = {"request": [lambda r: sizes.append(len(r.content))]}
        done = replication.sync(db, FleetTarget(http, max_bytes=4096, max_changes=5), me)
    assert done.shipped == 30
    posts = sizes[1:]  # after the position's GET
    assert max(posts) <= 4096
    assert len(posts) > 30 // 5  # more requests than the count alone would need
    assert backup(running_fleet, me)["changes"] == 30


class Cut(FleetTarget):
    """A target whose connection to the fleet fails at the chosen batch: the fleet stops
    before it (nothing applied), or its answer is lost after the fleet applied it."""

    def __init__(self, http: httpx.Client, fail: Any) -> None:
        super().__init__(http)
        self.batches, self.fail = 0, fail

    def apply(self, node: str, changes: Any) -> int:
        self.batches += 1
        self.fail(self.batches)
        return super().apply(node, changes)


def test_an_interrupted_replication_resumes_without_duplicates_or_gaps(
    running_fleet: FleetServer, db: Database, host: ModelHost, tmp_path: Path
) -> None:
    data = tmp_path / "a"
    me = node(running_fleet, data).device_id
    fill(db, host, 300)

    def stop_the_fleet(batch: int) -> None:
        if batch == 4:
            running_fleet.stop()

    with device_client(running_fleet, data) as http, pytest.raises(UnavailableError):
        replication.sync(db, Cut(http, stop_the_fleet), me, batch=20)
    fleet = FleetServer(running_fleet.config).start(init=False)
    try:
        fleet.admin_token = running_fleet.admin_token
        assert backup(fleet, me)["changes"] == 60  # three batches of 20 got there

        lost: list[int] = []

        def lose_the_answer(response: httpx.Response) -> None:
            # The fleet applied the batch; the node never hears so.
            if response.request.method == "POST" and len(lost) < 1:
                lost.append(1)
                raise httpx.ReadError("connection reset", request=response.request)

        with device_client(fleet, data) as http:
            http.event_hooks = {"response": [lose_the_answer]}
            with pytest.raises(UnavailableError):
                replication.sync(db, FleetTarget(http), me, batch=20)
            assert backup(fleet, me)["changes"] == 80
            # Had the node sent that batch again as it was, the fleet would skip it all.
            assert FleetTarget(http).apply(me, replication.pending(db, 60, 20)) == 80
            assert backup(fleet, me)["changes"] == 80
            done = replication.sync(db, FleetTarget(http), me, batch=20)
        assert done.shipped == 220  # from where the fleet said, not from where the node was
        shown = backup(fleet, me)
        assert (shown["changes"], shown["position"], shown["records"]) == (
            300,
            log_seqs(db)[-1],
            300,
        )
        assert sorted(stored_bodies(fleet, me)) == sorted(live(db))
    finally:
        fleet.stop()


# -- who may do what ------------------------------------------------------------------------


@pytest.fixture
def devices(running_fleet: FleetServer, tmp_path: Path) -> Iterator[Callable[[], Device]]:
    """Enrolls devices with their mTLS clients (closed afterwards)."""
    made: list[Device] = []

    def make() -> Device:
        made.append(enroll_device(running_fleet, join_token(running_fleet), tmp_path))
        return made[-1]

    yield make
    for device in made:
        device.close()


def batch_of(db: Database) -> dict[str, Any]:
    return {"changes": [c.to_json() for c in replication.pending(db, 0)]}


def test_a_device_reads_and_writes_its_own_backup_only(
    running_fleet: FleetServer, db: Database, host: ModelHost, devices: Callable[[], Device]
) -> None:
    a, b = devices(), devices()
    fill(db, host, 3)
    mine = batch_of(db)
    answer = a.http.post(f"/api/v1/memory/{a.device_id}/changes", json=mine)
    assert answer.status_code == 200, answer.text
    before = table_snapshot(running_fleet.db)

    for method, path, body in (
        ("GET", f"/api/v1/memory/{a.device_id}", None),
        ("GET", f"/api/v1/memory/{a.device_id}/records", None),
        ("POST", f"/api/v1/memory/{a.device_id}/changes", mine),
    ):
        refused = b.http.request(method, path, json=body)
        assert refused.status_code == 403, (path, refused.text)
        assert refused.json()["error"] == "permission_denied"
    with running_fleet.http() as anonymous:  # no client certificate at all
        assert anonymous.get(f"/api/v1/memory/{a.device_id}/records").status_code == 401
    assert table_snapshot(running_fleet.db) == before
    refusals = audit_rows(running_fleet, actor=f"device:{b.device_id}", outcome="refused")
    assert {r["action"] for r in refusals} == {"memory.position", "memory.read", "memory.write"}
    assert all(r["target"] == f"device/{a.device_id}/memory" for r in refusals)
    page = a.http.get(f"/api/v1/memory/{a.device_id}/records").json()
    assert sorted(r["id"] for r in page["records"]) == sorted(live(db))
    assert page["next"] is None
    # Pages end at a count, or at a size (past their first record).
    first = a.http.get(f"/api/v1/memory/{a.device_id}/records", params={"limit": 2}).json()
    rest = a.http.get(f"/api/v1/memory/{a.device_id}/records", params={"after": first["next"]})
    assert [r["id"] for r in first["records"] + rest.json()["records"]] == sorted(live(db))
    with running_fleet.db.read() as conn:
        small = memory_backups.live_records(conn, a.device_id, max_bytes=1)
    assert (len(small.records), small.next) == (1, small.records[0].id)


def test_malformed_and_oversized_batches_are_refused_without_harm(
    running_fleet: FleetServer, db: Database, host: ModelHost, devices: Callable[[], Device]
) -> None:
    a = devices()
    fill(db, host, 3)
    good = batch_of(db)["changes"]
    url = f"/api/v1/memory/{a.device_id}/changes"
    assert a.http.post(url, json={"changes": good[:1]}).status_code == 200
    before = table_snapshot(running_fleet.db)
    other = {**good[2], "body": {**good[2]["body"], "id": good[1]["record"]}}
    cases: list[tuple[Any, str]] = [
        ({"changes": [{**good[1], "seq": 0}]}, "changes.0.seq"),
        ({"changes": [good[2], good[1]]}, "sequences must rise"),
        ({"changes": [other]}, "the body is of record"),
        ({"changes": [{**good[1], "op": "delete"}]}, "a delete carries no body"),
        ({"changes": [{**good[1], "body": {**good[1]["body"], "vector": "a!"}}]}, "vector"),
        ({"changes": [{**good[1], "extra": 1}]}, "extra"),
        ({"changes": []}, "changes"),
        ("not json", "MemoryBatch"),
    ]
    for body, says in cases:
        content = body.encode() if isinstance(body, str) else orjson.dumps(body)
        refused = a.http.post(url, content=content)
        assert refused.status_code == 400, (body, refused.text)
        assert says in refused.json()["message"], refused.text
    huge = b'{"changes":[' + b" " * MAX_MEMORY_BATCH_BYTES + b"]}"
    refused = a.http.post(url, content=huge)
    assert refused.status_code == 400
    assert "split it" in refused.json()["message"]
    assert table_snapshot(running_fleet.db) == before
    refusals = audit_rows(running_fleet, actor=f"device:{a.device_id}", action="memory.write")
    assert len(refusals) == len(cases) + 1


# -- a replacement device -------------------------------------------------------------------

NOTES = {
    "lyon": "the supplier in Lyon delivers fresh bread every Tuesday morning",
    "milk": "milk runs out on Saturdays when the weather is hot",
    "keys": "the spare keys of the back door hang in the office",
}


@pytest.fixture
def other_host(tmp_path: Path, model_dir: Path) -> Iterator[tuple[Database, ModelHost]]:
    """A second node's database and model host (the replacement device)."""
    with Database(tmp_path / "b" / "node.db") as db:
        host = register(ModelRegistry(db, tmp_path / "b" / "models"), model_dir / "hash-embed.onnx")
        yield db, host
        host.close()


def test_a_replacement_restores_the_replaced_devices_memory(
    running_fleet: FleetServer,
    db: Database,
    host: ModelHost,
    other_host: tuple[Database, ModelHost],
    tmp_path: Path,
) -> None:
    fleet = running_fleet
    old = node(fleet, tmp_path / "a")
    m = AgentMemory(db, host, "notes", CONFIG)
    ids = {key: m.remember(text, {"supplier": key}, subject=key) for key, text in NOTES.items()}
    m.commit()
    assert replicator(fleet, db, tmp_path / "a", old).replicate(old) is not None

    with fleet.client() as admin:
        deploy = admin.create_token("deployer", ["deploy"])["token"]
        with fleet.client(deploy) as client, pytest.raises(Exception, match="admin"):
            client.create_join_token(replaces=old.device_id)
        with pytest.raises(Exception, match="no device"):
            admin.create_join_token(replaces="no-such-device")
        with pytest.raises(Exception, match="uses must be 1"):
            admin.create_join_token(replaces=old.device_id, uses=2)
        made = admin.create_join_token(replaces=old.device_id, ttl_s=600)
    assert (made["group"], made["uses"], made["replaces"]) == (old.group, 1, old.device_id)

    # A plain join token gives no access to anyone's memory.
    bystander = node(fleet, tmp_path / "c")
    with device_client(fleet, tmp_path / "c") as http:
        stranger = FleetTarget(http)
        assert stranger.backup(bystander.device_id).replaces is None
        with pytest.raises(PermissionDeniedError, match="may not read"):
            list(stranger.records(old.device_id))
        with pytest.raises(PermissionDeniedError, match="only the device that replaces it"):
            stranger.release(old.device_id)

    new = node(fleet, tmp_path / "b", made["token"])
    with pytest.raises(AuthenticationError, match="revoked"):  # the old device is out
        replicator(fleet, db, tmp_path / "a", old).replicate(old)
    new_db, new_host = other_host

    async def first_start() -> None:
        memory = replicator(fleet, new_db, tmp_path / "b", new)
        await memory.start()
        try:
            for _ in range(200):
                if state.get_value(new_db, RESTORED) and not replication.behind(
                    new_db, "fleet", new.device_id
                ):
                    break
                await asyncio.sleep(0.05)
        finally:
            await memory.stop()

    asyncio.run(first_start())
    assert state.get_value(new_db, RESTORED)["from"] == old.device_id
    assert live(new_db) == live(db)  # text and vectors, as they were
    recall = AgentMemory(new_db, new_host, "notes", CONFIG).recall
    recalled = recall("who delivers bread", k=1)
    assert recalled[0].id == ids["lyon"]
    assert recalled[0].metadata == {"supplier": "lyon"}
    shown = backup(fleet, new.device_id)  # the restored records are the new device's own now
    assert (shown["records"], shown["replaces"]) == (3, old.device_id)
    # ...and moved, not copied: the old device's backup let them go.
    assert backup(fleet, old.device_id)["records"] == 0
    assert stored_bodies(fleet, old.device_id) == {}
    released = audit_rows(fleet, action="memory.release", outcome="ok")
    assert released[0]["actor"] == f"device:{new.device_id}"

    # The agent was not here yet at the restore: filtered recall finds its records once
    # the fleet has deployed it.
    assert recall("bread", k=3, where={"supplier": "lyon"}) == []
    bundle = make_bundle(tmp_path / "deployed", "def first(ctx, data):\n    return data\n"
                         "def second(ctx, data):\n    return data\n")  # fmt: skip
    manage.add_agent(new_db, bundle, tmp_path / "agents", models=[], connectors=[])
    assert replicator(fleet, new_db, tmp_path / "b", new).replicate(new) is not None
    assert [r.id for r in recall("bread", k=3, where={"supplier": "lyon"})] == [ids["lyon"]]
    assert state.get_value(new_db, RESTORED)["unindexed"] == []

    with device_client(fleet, tmp_path / "b") as http:  # reading the old backup, never writing
        refused = http.post(f"/api/v1/memory/{old.device_id}/changes", json=batch_of(new_db))
        assert refused.status_code == 403
    # Forgotten on the new device, a record is not restored again at the next start.
    forget = AgentMemory(new_db, new_host, "notes", CONFIG)
    forget.forget(id=ids["keys"])
    forget.commit()
    again = replicator(fleet, new_db, tmp_path / "b", new).replicate(new)
    assert again is not None
    assert ids["keys"] not in live(new_db)
    assert ids["keys"] not in stored_bodies(fleet, new.device_id)
    enrolled = audit_rows(fleet, action="enroll", outcome="ok")
    assert f"replaces device {old.device_id} (revoked)" in enrolled[0]["detail"]


# -- real node processes ------------------------------------------------------------------


def remember_notes(data: Path, model_dir: Path) -> dict[str, str]:
    """NOTES in the memory of the node over ``data``, written before it starts."""
    settings = load_settings({"data_dir": data}, environ={})
    with Database(settings.database_path) as db:
        host = register(ModelRegistry(db, settings.model_store), model_dir / "hash-embed.onnx")
        m = AgentMemory(db, host, "notes", CONFIG)
        ids = {key: m.remember(text, {"supplier": key}, subject=key) for key, text in NOTES.items()}
        m.commit()
        host.close()
    return ids


def wait_until(what: str, check: Callable[[], bool], process: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s\n{process.log()}"
        time.sleep(0.1)


@pytest.fixture
def quick_fleet(tmp_path: Path, fleet_db_url: str) -> Iterator[FleetServer]:
    """A fleet whose nodes long-poll a second at most, so it stops at once after them."""
    server = FleetServer(fleet_config(tmp_path / "fleet", fleet_db_url, sync_interval_s=1.0))
    try:
        yield server.start()
    finally:
        server.stop()


def test_node_processes_replicate_and_a_replacement_restores_on_its_first_start(
    quick_fleet: FleetServer, tmp_path: Path, model_dir: Path
) -> None:
    fleet, old_dir, new_dir = quick_fleet, tmp_path / "old", tmp_path / "new"
    ids = remember_notes(old_dir, model_dir)

    def records(device: str) -> int:
        return int(backup(fleet, device)["records"])

    old = node_process(old_dir, EDGEOS_JOIN_TOKEN=join_token(fleet))
    old.command += ["--fleet", fleet.url]
    with old:
        wait_until("the node enrolled", FleetPaths.of(old_dir).cert.exists, old)
        old_id = FleetPaths.of(old_dir).device_id.read_text().strip()
        wait_until("its memory reached the fleet", lambda: records(old_id) == 3, old)
    with fleet.client() as admin:
        token = admin.create_join_token(replaces=old_id)["token"]
    new = node_process(new_dir, EDGEOS_JOIN_TOKEN=token)
    new.command += ["--fleet", fleet.url]
    with new:
        wait_until("the replacement enrolled", FleetPaths.of(new_dir).cert.exists, new)
        new_id = FleetPaths.of(new_dir).device_id.read_text().strip()
        wait_until("the old memory moved", lambda: records(old_id) == 0, new)
        assert records(new_id) == 3
        with fleet.client() as admin:
            assert admin.device(old_id)["status"] == "revoked"
    settings = load_settings({"data_dir": new_dir}, environ={})
    with Database(settings.database_path) as db:
        host = register(ModelRegistry(db, settings.model_store), model_dir / "hash-embed.onnx")
        try:
            found = AgentMemory(db, host, "notes", CONFIG).recall("when is milk short", k=1)
        finally:
            host.close()
    assert found[0].id == ids["milk"]


def test_the_cli_makes_a_replacement_token(
    running_fleet: FleetServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from edgeos.cli.main import app

    monkeypatch.setenv("EDGEOS_FLEET_CONFIG", str(tmp_path / "login.json"))
    monkeypatch.setenv("EDGEOS_FLEET_URL", running_fleet.url)
    monkeypatch.setenv("EDGEOS_FLEET_TOKEN", running_fleet.admin_token)
    monkeypatch.setenv("COLUMNS", "200")

    def fleet(*args: str) -> str:
        result = CliRunner().invoke(app, ["fleet", *args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == 0, result.output
        return result.output

    old = node(running_fleet, tmp_path / "old")
    with pytest.raises(ConfigError, match="--group"):
        fleet("join-token", "create")
    with pytest.raises(ConfigError, match="enrolls one device"):
        fleet("join-token", "create", "--replaces", old.device_id, "--uses", "2")
    with pytest.raises(NotFoundError, match="no device"):
        fleet("join-token", "create", "--replaces", "not-enrolled")
    out = fleet("join-token", "create", "--replaces", old.device_id, "--ttl", "10m")
    assert f"for group {old.group}, 1 use(s), replaces device {old.device_id}" in out
    new = node(running_fleet, tmp_path / "new", out.strip().splitlines()[-1])
    assert backup(running_fleet, new.device_id)["replaces"] == old.device_id
    made = audit_rows(running_fleet, action="join-token.create", outcome="ok")
    assert f"replaces device {old.device_id}" in made[0]["detail"]
