"""Secrets granted by the fleet: sealed at rest and to each device, scoped, expiring,
revocable; and a vault key bound to the device identity."""

from __future__ import annotations

import base64
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from edgeos.cli.main import app
from edgeos.connectors.vault import SecretError, Vault, load_key
from edgeos.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    VerificationError,
)
from edgeos.fleet import tables
from edgeos.fleet.db import device_revision
from edgeos.protocol.fleet import SealedSecret, SecretGrants
from edgeos.security.keys import generate_key, load_private_key, write_private_key
from edgeos.security.sealing import open_sealed, seal
from edgeos.state import Database
from edgeos.sync.grants import apply_grants
from tests.fleet_support import (
    Device,
    FleetServer,
    audit_rows,
    enroll_device,
    join_token,
    table_snapshot,
)
from tests.stored import stored_bytes

VALUE = "pg-pass-7Hq2vX9mK4rT"
WEEK = 7 * 86400.0


# -- sealing ------------------------------------------------------------------------------


def test_a_sealed_box_opens_only_for_its_key_and_its_associated_data() -> None:
    key, other = generate_key(), generate_key()
    box = seal(key.public_key(), b"the value", b"device-1")
    assert open_sealed(key, box, b"device-1") == b"the value"
    assert b"the value" not in box
    with pytest.raises(VerificationError, match="does not open"):
        open_sealed(other, box, b"device-1")
    with pytest.raises(VerificationError, match="does not open"):
        open_sealed(key, box, b"device-2")
    tampered = box[:-1] + bytes([box[-1] ^ 1])
    with pytest.raises(VerificationError, match="does not open"):
        open_sealed(key, tampered, b"device-1")
    with pytest.raises(VerificationError, match="format"):
        open_sealed(key, b"\x02" + box[1:], b"device-1")


# -- the vault key, bound to the device identity --------------------------------------------


def _node_with_secret(data: Path) -> None:
    with Database(data / "node.db") as db:
        Vault(db, load_key(data)).set("token", VALUE, scopes=["supplier"])


def test_the_vault_key_is_wrapped_once_the_node_has_a_device_key(tmp_path: Path) -> None:
    data = tmp_path / "node"
    _node_with_secret(data)  # not enrolled: a plain key, as vaults were before binding
    plain = (data / "keys" / "vault.key").read_bytes()
    assert len(plain) == 32
    write_private_key(data / "fleet" / "device.key", generate_key())
    assert load_key(data) == plain  # the same key, now wrapped in place
    wrapped = (data / "keys" / "vault.key").read_bytes()
    assert plain not in wrapped
    assert wrapped.startswith(b"edgeos vault key")
    with Database(data / "node.db") as db:
        assert Vault(db, load_key(data)).get("token", scope="supplier") == VALUE


def test_a_copied_vault_is_useless_without_its_device_key(tmp_path: Path) -> None:
    data = tmp_path / "node"
    write_private_key(data / "fleet" / "device.key", generate_key())
    _node_with_secret(data)
    copy = tmp_path / "elsewhere"
    (copy / "keys").mkdir(parents=True)
    shutil.copy(data / "node.db", copy / "node.db")
    shutil.copy(data / "keys" / "vault.key", copy / "keys" / "vault.key")
    with pytest.raises(ConfigError, match=r"bound to the device identity.*device.key is missing"):
        load_key(copy)
    write_private_key(copy / "fleet" / "device.key", generate_key())
    with pytest.raises(ConfigError, match="bound to another device identity"):
        load_key(copy)
    # Nothing was changed by the refusals: the right key still opens the original.
    with Database(data / "node.db") as db:
        assert Vault(db, load_key(data)).get("token", scope="supplier") == VALUE


def test_a_key_file_is_made_once_when_processes_race(tmp_path: Path) -> None:
    from edgeos.files import write_new

    path = tmp_path / "keys" / "vault.key"
    assert write_new(path, b"\x01" * 32)
    assert not write_new(path, b"\x02" * 32)  # the later one reads the first one's key
    assert load_key(tmp_path) == b"\x01" * 32
    assert sorted(p.name for p in path.parent.iterdir()) == ["vault.key"]


def test_a_damaged_vault_key_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "vault.key").write_bytes(b"short")
    with pytest.raises(ConfigError, match=r"vault.key is not a vault key \(5 bytes"):
        load_key(tmp_path)


# -- the fleet: grants over the API ---------------------------------------------------------


def _grant(fleet: FleetServer, name: str = "pg_password", **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"scopes": ["orders"], "expires_s": WEEK, **kwargs}
    with fleet.client() as client:
        return client.grant_secret(name, kwargs.pop("value", VALUE), **{
            k: v for k, v in args.items() if k != "value"})  # fmt: skip


def _fetch(device: Device) -> SecretGrants:
    response = device.http.get("/api/v1/secrets")
    assert response.status_code == 200, response.text
    return SecretGrants.model_validate_json(response.content)


def _open(device: Device, grant: SealedSecret) -> str:
    key = load_private_key(device.key_path)
    box = base64.b64decode(grant.sealed)
    return open_sealed(key, box, grant.associated_data(device.device_id)).decode()


def _fleet_files(fleet: FleetServer) -> bytes:
    return b"".join(p.read_bytes() for p in fleet.config.data_dir.rglob("fleet.db*"))


def test_a_grant_reaches_its_device_sealed_and_no_other(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    token = join_token(running_fleet, uses=3)
    a = enroll_device(running_fleet, token, tmp_path)
    b = enroll_device(running_fleet, token, tmp_path)
    with running_fleet.db.read() as conn:
        before = {d.device_id: device_revision(conn, d.device_id) for d in (a, b)}
    made = _grant(running_fleet, device=a.device_id)
    assert VALUE not in str(made)
    assert (made["version"], made["scopes"], made["state"]) == (1, ["orders"], "active")
    got = _fetch(a)
    assert got.revision > before[a.device_id]  # its long poll wakes, it fetches again
    assert _fetch(b).revision == before[b.device_id]  # no other device's does
    [grant] = got.grants
    assert (grant.grant_id, grant.name, grant.scopes) == (made["id"], "pg_password", ["orders"])
    assert _open(a, grant) == VALUE
    assert _fetch(b).grants == []
    # Replayed to another device, or with a field edited, it does not open.
    key_b = load_private_key(b.key_path)
    with pytest.raises(VerificationError):
        open_sealed(key_b, base64.b64decode(grant.sealed), grant.associated_data(b.device_id))
    for edit in ({"scopes": ["orders", "payroll"]}, {"expires_at": grant.expires_at + WEEK},
                 {"name": "other"}, {"version": 2}):  # fmt: skip
        with pytest.raises(VerificationError):
            _open(a, grant.model_copy(update=edit))
    # Neither the fleet's database nor its audit log holds the value.
    if running_fleet.config.database_url.startswith("sqlite"):
        assert VALUE.encode() not in _fleet_files(running_fleet)
    with running_fleet.db.read() as conn:
        stored = conn.execute(sa.select(tables.secret_grants.c.ciphertext)).scalar()
    assert stored is not None
    assert VALUE.encode() not in stored
    audit = audit_rows(running_fleet)
    assert VALUE not in str(audit)
    assert {"secret.grant", "secret.deliver"} <= {r["action"] for r in audit}
    a.close()
    b.close()


def test_group_grants_device_grants_and_new_versions(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    token = join_token(running_fleet, group="stores", uses=2)
    a = enroll_device(running_fleet, token, tmp_path)
    b = enroll_device(running_fleet, token, tmp_path)
    _grant(running_fleet, group="stores", value="group-value-1")
    _grant(running_fleet, device=a.device_id, value="device-value-2")
    [for_a] = _fetch(a).grants
    [for_b] = _fetch(b).grants
    assert (_open(a, for_a), for_a.version) == ("device-value-2", 2)  # its own wins
    assert (_open(b, for_b), for_b.version) == ("group-value-1", 1)
    _grant(running_fleet, group="stores", value="group-value-3")
    [for_b] = _fetch(b).grants
    assert (_open(b, for_b), for_b.version) == ("group-value-3", 3)  # the newest
    a.close()
    b.close()


def test_revoked_and_expired_grants_are_no_longer_sent(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    made = _grant(running_fleet, device=device.device_id)
    assert len(_fetch(device).grants) == 1
    with running_fleet.client() as client:
        done = client.revoke_secret_grant(made["id"])
        assert done["state"] == "revoked"
        with pytest.raises(ConflictError, match="revoked already"):
            client.revoke_secret_grant(made["id"])
        with pytest.raises(NotFoundError, match="no secret grant"):
            client.revoke_secret_grant("grant-nope")
    assert _fetch(device).grants == []
    with running_fleet.db.read() as conn:
        assert conn.execute(sa.select(tables.secret_grants.c.ciphertext)).scalar() == b""
    made = _grant(running_fleet, device=device.device_id)
    g = tables.secret_grants
    with running_fleet.db.begin() as conn:  # a grant whose time is up
        conn.execute(sa.update(g).where(g.c.id == made["id"]).values(expires_at=1.0))
    assert _fetch(device).grants == []
    with running_fleet.client() as client:
        states = {g["id"]: g["state"] for g in client.secret_grants(name="pg_password")}
        assert states[made["id"]] == "expired"
        assert client.secret_grants(active="true") == []
    device.close()


def test_an_edited_grant_row_is_not_sent(running_fleet: FleetServer, tmp_path: Path) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet, uses=2), tmp_path)
    other = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    made = _grant(running_fleet, device=other.device_id)
    kept = _grant(running_fleet, "kept", device=device.device_id)
    g = tables.secret_grants
    with running_fleet.db.begin() as conn:  # someone with the database moves a grant
        conn.execute(sa.update(g).where(g.c.id == made["id"]).values(device_id=device.device_id))
    assert [x.grant_id for x in _fetch(device).grants] == [kept["id"]]
    device.close()
    other.close()


def test_bad_grants_are_refused_audited_and_change_nothing(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    before = table_snapshot(running_fleet.db)
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"device": device.device_id, "scopes": []}, ConfigError, "scopes"),
        ({"device": device.device_id, "scopes": ["bad scope"]}, ConfigError, "scope 'bad scope'"),
        ({"device": device.device_id, "group": "stores"}, ConfigError, "exactly one"),
        ({}, ConfigError, "exactly one"),
        ({"device": "no-such-device"}, NotFoundError, "no device no-such-device"),
        ({"group": "nobody-here"}, NotFoundError, "no device in group 'nobody-here'"),
        ({"device": device.device_id, "expires_s": 400 * 86400.0}, ConfigError, "366 days"),
        ({"device": device.device_id, "value": ""}, ConfigError, "value"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            _grant(running_fleet, **kwargs)
    with pytest.raises(ConfigError, match="secret name"):
        _grant(running_fleet, "bad name!", device=device.device_id)
    assert table_snapshot(running_fleet.db) == before
    refused = audit_rows(running_fleet, action="secret.grant", outcome="refused")
    assert len(refused) == len(cases) + 1
    assert VALUE not in str(refused)
    # Only deploy (or admin) may grant or list; devices cannot use operator routes.
    with running_fleet.client() as admin:
        reader = admin.create_token("auditor", ["read"])["token"]
    with running_fleet.client(reader) as client, pytest.raises(PermissionDeniedError):
        client.grant_secret("x", VALUE, scopes=["a"], expires_s=60, device=device.device_id)
    with running_fleet.client(reader) as client, pytest.raises(PermissionDeniedError):
        client.secret_grants()
    assert device.http.get("/api/v1/secret-grants").status_code == 401
    with running_fleet.http() as anonymous:
        assert anonymous.get("/api/v1/secrets").status_code == 401
    device.close()


def test_the_cli_grants_lists_and_revokes_without_showing_values(
    running_fleet: FleetServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    monkeypatch.setenv("EDGEOS_FLEET_CONFIG", str(tmp_path / "fleet.json"))
    monkeypatch.setenv("EDGEOS_FLEET_URL", running_fleet.url)
    monkeypatch.setenv("EDGEOS_FLEET_TOKEN", running_fleet.admin_token)
    monkeypatch.setenv("COLUMNS", "250")
    runner = CliRunner()

    def fleet(*args: str, stdin: str | None = None) -> Any:
        return runner.invoke(app, ["fleet", "secrets", *args], input=stdin)

    granted = fleet("grant", "pg_password", "--device", device.device_id, "--scope", "orders",
                    "--expires", "7d", stdin=VALUE + "\n")  # fmt: skip
    assert granted.exit_code == 0, granted.output
    assert "version 1" in granted.output
    assert VALUE not in granted.output
    value_file = tmp_path / "value.txt"
    value_file.write_text("from-a-file-0042\n")
    second = fleet("grant", "smtp_login", "--device", device.device_id, "--scope", "mail",
                   "--expires", "1d", "--from-file", str(value_file), "--json")  # fmt: skip
    assert second.exit_code == 0, second.output
    grant_id = second.stdout[second.stdout.index("grant-") :].split('"')[0]
    assert {_open(device, g) for g in _fetch(device).grants} == {VALUE, "from-a-file-0042"}
    listing = fleet("list")
    assert "pg_password" in listing.output
    assert "smtp_login" in listing.output
    assert VALUE not in listing.output
    assert "revoked" in fleet("revoke", grant_id).output
    assert [g.name for g in _fetch(device).grants] == ["pg_password"]
    both = fleet("grant", "x", "--device", device.device_id, "--group", "stores", "--scope",
                 "a", "--expires", "1d", stdin="abcdef")  # fmt: skip
    assert both.exit_code != 0
    assert "--device ID or --group G" in str(both.exception or both.output)
    device.close()


# -- the node: grants into the vault ------------------------------------------------------


def test_the_node_keeps_its_grants_in_step_with_the_fleet(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    data = tmp_path / "node"
    (data / "fleet").mkdir(parents=True)
    shutil.copy(device.key_path, data / "fleet" / "device.key")
    first = _grant(running_fleet, device=device.device_id)
    _grant(running_fleet, "mqtt_password", device=device.device_id, value="mqtt-secret-99",
           scopes=["sensors"])  # fmt: skip
    with Database(data / "node.db") as db:
        done = apply_grants(db, data, _fetch(device).grants, device.device_id)
        assert sorted(done.stored) == ["mqtt_password", "pg_password"]
        vault = Vault(db, load_key(data))
        assert vault.get("pg_password", scope="orders") == VALUE
        with pytest.raises(SecretError, match="not granted to scope 'sensors'"):
            vault.get("pg_password", scope="sensors")
        assert vault.info("pg_password").grant_id == first["id"]
        # The fleet's grant is the fleet's to change.
        with pytest.raises(ConfigError, match="granted by the fleet"):
            vault.set("pg_password", "local-value", scopes=["orders"])
        with pytest.raises(ConfigError, match="granted by the fleet"):
            vault.remove("pg_password")
        # A grant that does not open (sealed for another device) is refused, never stored.
        forged = _fetch(device).grants
        tampered = [forged[0].model_copy(update={"version": 9}), forged[1]]
        done = apply_grants(db, data, tampered, device.device_id)
        assert done.refused == [forged[0].grant_id]
        assert done.removed == ["mqtt_password" if forged[0].name == "mqtt_password"
                                else "pg_password"]  # fmt: skip
        # Revoked at the fleet: gone from the vault at the next pass, and from the file.
        vault.set("local_token", "kept-on-the-same-page", scopes=["orders"])
        sealed = (
            db.reader()
            .execute("SELECT ciphertext FROM secrets WHERE name = 'pg_password'")
            .fetchone()[0]
        )
        db.checkpoint()  # in the database file itself, as it would be after a while
        with db.transaction() as conn:  # as SQLite is built by default: freed bytes stay
            conn.execute("PRAGMA secure_delete = 0")
        with running_fleet.client() as client:
            client.revoke_secret_grant(first["id"])
        done = apply_grants(db, data, _fetch(device).grants, device.device_id)
        assert "pg_password" in done.removed
        with pytest.raises(SecretError, match="not in this node's vault"):
            vault.get("pg_password", scope="orders")
        db.checkpoint()
    for path in data.rglob("node.db*"):
        assert VALUE.encode() not in stored_bytes([path])
        assert sealed not in stored_bytes([path]), f"the revoked secret's row lingers in {path}"
    device.close()


def test_an_expired_grant_is_refused_at_use_naming_secret_and_expiry(tmp_path: Path) -> None:
    with Database(tmp_path / "node.db") as db:
        vault = Vault(db, load_key(tmp_path))
        vault.grant("pg_password", VALUE, scopes=["orders"], expires_at=1_000_000.0, version=1,
                    grant_id="grant-1")  # fmt: skip
        with pytest.raises(SecretError) as info:
            vault.get("pg_password", scope="orders")
        message = str(info.value)
        assert "secret 'pg_password' expired at 1970-01-12T13:46:40+00:00" in message
        assert "grant-1" in message
        assert VALUE not in message


def test_the_node_migration_adds_the_grant_column(tmp_path: Path) -> None:
    with Database(tmp_path / "node.db") as db:
        assert "0009_secret_grants" in db.applied_migrations()
    columns = [
        r[1] for r in sqlite3.connect(tmp_path / "node.db").execute("PRAGMA table_info(secrets)")
    ]
    assert "grant_id" in columns


def test_fetching_grants_needs_a_device_certificate(running_fleet: FleetServer) -> None:
    with httpx.Client(base_url=running_fleet.url, verify=False) as http:
        assert http.get("/api/v1/secrets").status_code == 401
