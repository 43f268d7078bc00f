"""The fleet's HTTP API against a real TLS server, on SQLite and PostgreSQL.

Operator tokens and scopes, the OpenAPI document, publishing artifacts into the TUF
repository (and downloading them with the node's TUF client), the desired state and
long polls of sync, and two replicas sharing one database.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from edgeos.errors import AuthenticationError, ConflictError, ManifestError, PermissionDeniedError
from edgeos.fleet import tables
from edgeos.fleet.db import bump_revision
from edgeos.fleet.packing import pack_artifact, pack_directory
from edgeos.fleet.settings import FleetConfig
from edgeos.sync.tuf_client import TufClient
from tests.fleet_support import (
    Device,
    FleetServer,
    agent_dir,
    audit_rows,
    enroll_device,
    fleet_config,
    join_token,
    model_dir,
    policy_file,
    table_snapshot,
)

# -- operators ----------------------------------------------------------------------------


def test_missing_unknown_and_revoked_tokens_are_401(running_fleet: FleetServer) -> None:
    with running_fleet.http() as http:
        assert http.get("/api/v1/whoami").status_code == 401
        assert http.get("/api/v1/whoami", headers={"Authorization": "Basic x"}).status_code == 401
    pin = running_fleet.admin_token.rpartition(".")[2]
    with (
        running_fleet.client("A" * 43 + "." + pin) as stranger,
        pytest.raises(AuthenticationError, match="unknown operator token"),
    ):
        stranger.whoami()
    with running_fleet.client() as admin:
        made = admin.create_token("ci", ["read"])
        with running_fleet.client(made["token"]) as ci:
            assert ci.whoami()["scopes"] == ["read"]
            admin.revoke_token(made["id"])
            with pytest.raises(AuthenticationError, match="revoked"):
                ci.whoami()
    refusals = audit_rows(running_fleet, outcome="refused")
    assert {r["action"] for r in refusals} == {"authorize"}
    assert any(r["actor"] == "operator:ci" for r in refusals)


def test_the_last_admin_token_cannot_be_revoked(running_fleet: FleetServer) -> None:
    with running_fleet.client() as admin:
        me = admin.whoami()
        with pytest.raises(ConflictError, match="last admin token: create another"):
            admin.revoke_token(me["id"])
        assert admin.whoami()["id"] == me["id"]  # still valid: the refusal changed nothing
        other = admin.create_token("second admin", ["admin"])
        admin.revoke_token(me["id"])
    with running_fleet.client(other["token"]) as second:
        assert "admin" in second.whoami()["scopes"]
        refused = second.audit(outcome="refused")
    assert [r["action"] for r in refused] == ["token.revoke"]


def test_scopes_admin_implies_deploy_implies_read(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    with running_fleet.client() as admin:
        reader = admin.create_token("reader", ["read"])["token"]
        deployer = admin.create_token("deployer", ["deploy"])["token"]
        assert admin.create_token("boss", ["admin"])["scopes"] == ["read", "deploy", "admin"]
    with running_fleet.client(reader) as r, running_fleet.client(deployer) as d:
        assert [x["id"] for x in r.devices()] == [device.device_id]
        with pytest.raises(PermissionDeniedError, match="'deploy' scope"):
            r.set_labels(device.device_id, {"zone": "north"})
        assert d.set_labels(device.device_id, {"zone": "north"}) == {"zone": "north"}
        assert d.device(device.device_id)["labels"] == {"zone": "north"}
        with pytest.raises(PermissionDeniedError, match="'admin' scope"):
            d.revoke_device(device.device_id)
        with pytest.raises(PermissionDeniedError):
            d.create_join_token("stores")
        with pytest.raises(PermissionDeniedError):
            d.audit()
    denied = [r for r in audit_rows(running_fleet, outcome="refused") if "scope" in r["detail"]]
    assert {r["actor"] for r in denied} == {"operator:reader", "operator:deployer"}
    assert any(r["target"] == f"PUT /api/v1/devices/{device.device_id}/labels" for r in denied)
    device.close()


def test_openapi_document_lists_every_route(running_fleet: FleetServer) -> None:
    with running_fleet.http() as http:
        doc = http.get("/api/v1/openapi.json").json()
        ca = http.get("/api/v1/ca")
    assert doc["openapi"].startswith("3.")
    for path in ("/api/v1/enroll", "/api/v1/sync", "/api/v1/devices/{device_id}/labels",
                 "/api/v1/artifacts/{kind}/{name}/{version}", "/tuf/metadata/{file}"):  # fmt: skip
        assert path in doc["paths"], path
    assert doc["paths"]["/api/v1/sync"]["post"]["security"] == [{"deviceCertificate": []}]
    assert "SyncRequest" in doc["components"]["schemas"]
    assert ca.text == running_fleet.ca_pem


def test_bad_bodies_are_400_naming_the_field(running_fleet: FleetServer) -> None:
    with running_fleet.client() as admin:
        with pytest.raises(Exception, match=r"field 'scopes\.0'"):
            admin.create_token("x", ["root"])
        with pytest.raises(Exception, match="group 'bad group'"):
            admin.create_join_token("bad group")
        with pytest.raises(Exception, match="no device 'nope'"):
            admin.device("nope")


# -- artifacts ----------------------------------------------------------------------------


def test_publish_round_trip_through_tuf(running_fleet: FleetServer, tmp_path: Path) -> None:
    published = {}
    with running_fleet.client() as admin:
        for kind, path in [
            ("agent", agent_dir(tmp_path / "a")),
            ("model", model_dir(tmp_path / "m")),
            ("policy", policy_file(tmp_path / "p")),
        ]:
            data, name, version = pack_artifact(kind, path)
            row = admin.publish(kind, name, version, data)
            published[row["target"]] = data
            assert admin.publish(kind, name, version, data)["sha256"] == row["sha256"]
        assert sorted(published) == [
            "agents/restock/1.tar.gz", "models/risk/1.tar.gz", "policies/stores/1.yaml",
        ]  # fmt: skip
        assert len(admin.artifacts()) == 3
        with pytest.raises(ConflictError, match="other bytes"):
            admin.publish("policy", "stores", "1", b"kind: policy\nname: stores\nversion: '1'\n")

    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    tuf = TufClient(tmp_path / "tuf-meta", tmp_path / "tuf-targets", running_fleet.url, device.http)
    tuf.bootstrap(device.enrollment["tuf_root"].encode())
    tuf.refresh()
    for target, data in published.items():
        assert tuf.download(target) == data
    assert tuf.info("models/risk/1.tar.gz") == {"kind": "model", "name": "risk", "version": "1"}
    device.close()


def test_pack_directory_is_deterministic(tmp_path: Path) -> None:
    directory = agent_dir(tmp_path)
    first = pack_directory(directory)
    (directory / "__pycache__").mkdir()
    (directory / "__pycache__" / "agent.cpython-311.pyc").write_bytes(b"junk")
    (directory / "agent.py").touch()
    assert pack_directory(directory) == first


def _bad_artifact(case: str, root: Path) -> tuple[str, Path]:
    """A broken artifact of each kind: (kind, path)."""
    if case == "agent-step":
        return "agent", agent_dir(root, steps="check, missing")
    if case == "agent-version":
        return "agent", agent_dir(root, version="2")
    if case == "model-manifest":
        directory = model_dir(root)
        (directory / "model.yaml").write_text("name: risk\ntask: nonsense\n")
        return "model", directory
    path = policy_file(root)
    path.write_text("kind: policy\nname: stores\nversion: '1'\nbudgets: {max_concurrent_runs: 0}\n")
    return "policy", path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("agent-step", "agent.yaml: field 'steps.1': agent.py defines no function 'missing'"),
        ("agent-version", "field 'version': '2' differs from the published version '1'"),
        ("model-manifest", "model.yaml: field 'task'"),
        ("policy-field", "field 'budgets.max_concurrent_runs'"),
    ],
)
def test_bad_artifacts_are_refused_and_nothing_is_stored(
    running_fleet: FleetServer, tmp_path: Path, case: str, message: str
) -> None:
    kind, path = _bad_artifact(case, tmp_path)
    name = path.name.split("-")[0]
    data, _, _ = pack_artifact(kind, path, name=name, version="1")
    before = table_snapshot(running_fleet.db)
    with running_fleet.client() as admin, pytest.raises(ManifestError) as caught:
        admin.publish(kind, name, "1", data)
    assert message in str(caught.value)
    assert table_snapshot(running_fleet.db) == before
    assert audit_rows(running_fleet, outcome="refused")[0]["action"] == "publish"


def test_a_model_that_is_not_onnx_is_refused(running_fleet: FleetServer, tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    (directory / "risk.onnx").write_bytes(b"not a model")
    data, name, version = pack_artifact("model", directory)
    with (
        running_fleet.client() as admin,
        pytest.raises(Exception, match=r"risk\.onnx is not a valid ONNX"),
    ):
        admin.publish("model", name, version, data)
    with running_fleet.client() as admin, pytest.raises(Exception, match=r"not a readable tar\.gz"):
        admin.publish("agent", "restock", "1", b"plain bytes")


# -- sync: desired state and long polls ----------------------------------------------------


def assign(
    fleet: FleetServer, device: Device, target: str, kind: str, name: str, version: str
) -> int:
    """Assign a published artifact to a device by hand, as a rollout would; new revision."""
    with fleet.db.begin() as conn:
        conn.execute(
            sa.insert(tables.assignments).values(
                device_id=device.device_id, kind=kind, name=name, version=version,
                rollout_id=None, assigned_at=time.time(),
            )
        )  # fmt: skip
        return bump_revision(conn)


def test_sync_returns_assignments_and_records_the_report(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    first = device.sync().json()
    assert first["desired"] == []
    assert first["sync_interval_s"] == 30.0
    with running_fleet.client() as admin:
        data, name, version = pack_artifact("policy", policy_file(tmp_path / "p"))
        row = admin.publish("policy", name, version, data)
    revision = assign(running_fleet, device, row["target"], "policy", name, version)
    assert revision > first["revision"]
    report = {
        "revision": revision,
        "actual": [{"kind": "policy", "name": name, "version": version, "state": "active"}],
        "health": {"runs": 5, "runs_failed": 1, "status": "degraded"},
    }
    answer = device.sync(**report).json()
    assert answer["revision"] == revision
    assert answer["desired"] == [{"kind": "policy", "name": "stores", "version": "1",
                                  "target": "policies/stores/1.yaml", "rollout_id": None}]  # fmt: skip
    with running_fleet.client() as admin:
        shown = admin.device(device.device_id)
    assert shown["revision"] == revision
    assert shown["health"]["runs_failed"] == 1
    assert shown["actual"][0]["state"] == "active"
    assert device.sync(revision=revision, wait_s=0, bogus=1).status_code == 400
    device.close()


def test_long_poll_returns_when_the_revision_moves_else_after_wait(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    revision = device.sync().json()["revision"]

    started = time.monotonic()
    assert device.sync(revision=revision, wait_s=0.5).json()["revision"] == revision
    assert 0.45 <= time.monotonic() - started < 3

    def bump() -> None:
        time.sleep(0.3)
        with running_fleet.db.begin() as conn:
            bump_revision(conn)

    bumper = threading.Thread(target=bump)
    started = time.monotonic()
    bumper.start()
    moved = device.sync(revision=revision, wait_s=20).json()
    bumper.join()
    assert moved["revision"] == revision + 1
    assert time.monotonic() - started < 5
    # A device that is behind gets its answer at once, whatever wait_s says.
    started = time.monotonic()
    assert device.sync(revision=revision, wait_s=20).json()["revision"] == revision + 1
    assert time.monotonic() - started < 2
    device.close()


# -- replicas -----------------------------------------------------------------------------


def test_two_replicas_share_one_database(running_fleet: FleetServer, tmp_path: Path) -> None:
    # A second replica: the same keys, the same database, another port.
    config: FleetConfig = running_fleet.config
    second = FleetServer(fleet_config(config.data_dir, config.database_url))
    second.admin_token = running_fleet.admin_token
    second.start(init=False)
    try:
        token = join_token(running_fleet, "replicated")
        device = enroll_device(second, token, tmp_path)
        with running_fleet.client() as admin:
            assert admin.device(device.device_id)["group"] == "replicated"
            admin.revoke_device(device.device_id)
        assert device.sync().status_code == 401  # refused by the other replica
        device.close()
    finally:
        second.stop()


def test_migrations_create_exactly_the_schema_in_tables(fleet_db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from edgeos.fleet.db import FleetDatabase, current_revision

    db = FleetDatabase(fleet_db_url)
    try:
        db.migrate()
        db.migrate()  # a second start finds nothing to do
        with db.begin() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), tables.metadata)
            assert diff == []
            assert current_revision(conn) == 0
    finally:
        db.close()
