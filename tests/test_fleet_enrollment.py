"""Enrollment and device identity against a real TLS fleet, on SQLite and PostgreSQL.

Join tokens (one-time, expiring, group-scoped, multi-use), CSRs naming another device,
re-enrollment, and mutual TLS on the sync endpoint: no certificate, another CA's, a
forged one, a revoked device, a device asking for another's state, renewal.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from edgeos.errors import AuthenticationError
from edgeos.fleet.auth import authenticate_device
from edgeos.security.certs import CertificateAuthority, make_csr
from edgeos.security.keys import generate_key, write_private_key, write_public_file
from tests.fleet_support import (
    FleetServer,
    audit_rows,
    enroll_device,
    enroll_request,
    join_token,
    new_device_id,
    table_snapshot,
)


def refused(fleet: FleetServer, action: str) -> list[dict[str, object]]:
    return [r for r in audit_rows(fleet, outcome="refused") if r["action"] == action]


# -- join tokens --------------------------------------------------------------------------


def test_join_token_is_one_time_and_scopes_the_group(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    token = join_token(running_fleet, "north-stores")
    device = enroll_device(running_fleet, token, tmp_path)
    assert device.group == "north-stores"
    assert device.enrollment["ca_pem"] == running_fleet.ca_pem
    assert b'"_type":"root"' in device.enrollment["tuf_root"].encode().replace(b" ", b"")
    with running_fleet.client() as client:
        assert client.device(device.device_id)["group"] == "north-stores"

    before = table_snapshot(running_fleet.db)
    again = enroll_request(running_fleet, token, new_device_id())
    assert again.status_code == 401
    assert again.json()["error"] == "authentication"
    assert "already used" in again.json()["message"]
    assert table_snapshot(running_fleet.db) == before
    assert refused(running_fleet, "enroll")
    device.close()


def test_expired_join_token_is_refused(running_fleet: FleetServer) -> None:
    token = join_token(running_fleet, ttl_s=0.2)
    time.sleep(0.3)
    before = table_snapshot(running_fleet.db)
    response = enroll_request(running_fleet, token, new_device_id())
    assert response.status_code == 401
    assert "expired" in response.json()["message"]
    assert table_snapshot(running_fleet.db) == before


def test_join_token_with_uses_enrolls_that_many(running_fleet: FleetServer, tmp_path: Path) -> None:
    token = join_token(running_fleet, "lab", uses=3)
    devices = [enroll_device(running_fleet, token, tmp_path) for _ in range(3)]
    assert enroll_request(running_fleet, token, new_device_id()).status_code == 401
    with running_fleet.client() as client:
        listed = {d["id"] for d in client.devices(group="lab")}
    assert listed == {d.device_id for d in devices}
    for device in devices:
        device.close()


def test_malformed_unknown_and_foreign_join_tokens(running_fleet: FleetServer) -> None:
    pin = running_fleet.ca_pem and join_token(running_fleet).rpartition(".")[2]
    for token, reason in [
        ("not-a-token", "malformed"),
        ("A" * 43 + "." + pin, "unknown join token"),
        (join_token(running_fleet).rpartition(".")[0] + "." + "0" * 64, "another fleet"),
    ]:
        response = enroll_request(running_fleet, token, new_device_id())
        assert response.status_code == 401, token
        assert reason in response.json()["message"]


# -- CSRs and re-enrollment --------------------------------------------------------------


def test_csr_for_another_device_is_refused_and_spends_nothing(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    token = join_token(running_fleet)
    before = table_snapshot(running_fleet.db)
    device_id = new_device_id()
    response = enroll_request(running_fleet, token, device_id, csr_for=new_device_id())
    assert response.status_code == 400
    assert response.json()["error"] == "verification"
    assert f"sent for device '{device_id}'" in response.json()["message"]
    assert table_snapshot(running_fleet.db) == before  # the token was not spent either
    assert refused(running_fleet, "enroll")[0]["target"] == f"device/{device_id}"
    enroll_device(running_fleet, token, tmp_path, device_id=device_id).close()


def test_active_device_cannot_enroll_again(running_fleet: FleetServer, tmp_path: Path) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    before = table_snapshot(running_fleet.db)
    response = enroll_request(running_fleet, join_token(running_fleet), device.device_id)
    assert response.status_code == 409
    assert "active" in response.json()["message"]
    after = table_snapshot(running_fleet.db)
    assert after["devices"] == before["devices"]
    assert after["certificates"] == before["certificates"]
    device.close()


def test_revoked_device_comes_back_only_with_a_new_join_token(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    token = join_token(running_fleet, uses=1)
    device = enroll_device(running_fleet, token, tmp_path)
    assert device.sync().status_code == 200
    with running_fleet.client() as client:
        client.revoke_device(device.device_id)
    refused_sync = device.sync()  # its very next request
    assert refused_sync.status_code == 401
    assert "revoked" in refused_sync.json()["message"]

    assert enroll_request(running_fleet, token, device.device_id).status_code == 401
    back = enroll_device(running_fleet, join_token(running_fleet, "returned"), tmp_path / "b",
                         device_id=device.device_id)  # fmt: skip
    assert back.group == "returned"
    assert back.sync().status_code == 200
    assert device.sync().status_code == 401  # the old certificate stays revoked
    with running_fleet.client() as client:
        shown = client.device(device.device_id)
    assert shown["status"] == "active"
    assert [c["revoked"] for c in shown["certificates"]] == [True, False]
    device.close()
    back.close()


# -- mutual TLS on sync -------------------------------------------------------------------


def test_sync_without_a_client_certificate_is_401(running_fleet: FleetServer) -> None:
    with running_fleet.http() as http:
        response = http.post("/api/v1/sync", json={"device_id": new_device_id()})
        tuf = http.get("/tuf/metadata/timestamp.json")
    assert response.status_code == 401
    assert "client certificate" in response.json()["message"]
    assert refused(running_fleet, "sync")
    assert tuf.status_code == 401  # the TUF repository is for enrolled devices only
    assert refused(running_fleet, "authenticate")[0]["target"] == "GET /tuf/metadata/timestamp.json"


def _foreign_cert(ca: CertificateAuthority, tmp_path: Path, device_id: str) -> tuple[Path, Path]:
    key = generate_key()
    issued = ca.issue_device(make_csr(key, device_id), device_id=device_id, group="stores")
    write_private_key(tmp_path / "f.key", key)
    write_public_file(tmp_path / "f.crt", issued.pem)
    return tmp_path / "f.crt", tmp_path / "f.key"


def test_certificates_of_another_ca_and_forged_ones_are_refused(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    # Another CA, and a forgery: a CA made up with the fleet CA's very name, issuing a
    # certificate for an enrolled device. Both fail the TLS handshake.
    for ca in (CertificateAuthority.create("someone else"), CertificateAuthority.create()):
        cert, key = _foreign_cert(ca, tmp_path, device.device_id)
        with running_fleet.http(cert, key) as http, pytest.raises(httpx.TransportError):
            http.post("/api/v1/sync", json={"device_id": device.device_id})
        # And should TLS let one through, the app refuses it too.
        ctx = running_fleet.app_context()
        with ctx.db.read() as conn, pytest.raises(AuthenticationError, match="not issued"):
            authenticate_device(ctx, conn, cert.read_text(), now=time.time())
    assert device.sync().status_code == 200
    device.close()


def test_device_asking_for_another_devices_state_is_403(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    token = join_token(running_fleet, uses=2)
    a, b = (
        enroll_device(running_fleet, token, tmp_path),
        enroll_device(running_fleet, token, tmp_path),
    )
    response = a.sync(device_id=b.device_id)
    assert response.status_code == 403
    assert response.json()["error"] == "permission_denied"
    row = refused(running_fleet, "sync")[0]
    assert row["actor"] == f"device:{a.device_id}"
    assert b.device_id in str(row["detail"])
    a.close()
    b.close()


def test_renewal_in_sync(running_fleet: FleetServer, tmp_path: Path) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    key = generate_key()
    response = device.sync(csr_pem=make_csr(key, device.device_id))
    assert response.status_code == 200, response.text
    renewed = response.json()["certificate_pem"]
    assert renewed
    assert renewed != device.enrollment["certificate_pem"]
    write_private_key(tmp_path / "new.key", key)
    write_public_file(tmp_path / "new.crt", renewed)
    with running_fleet.http(tmp_path / "new.crt", tmp_path / "new.key") as http:
        assert http.post("/api/v1/sync", json={"device_id": device.device_id}).status_code == 200

    before = table_snapshot(running_fleet.db)
    other = device.sync(csr_pem=make_csr(generate_key(), new_device_id()))
    assert other.status_code == 400
    assert "names device" in other.json()["message"]
    assert table_snapshot(running_fleet.db)["certificates"] == before["certificates"]
    assert refused(running_fleet, "sync")
    device.close()


def test_expired_certificate_is_refused(running_fleet: FleetServer, tmp_path: Path) -> None:
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path)
    ctx = running_fleet.app_context()
    later = time.time() + timedelta(hours=25).total_seconds()
    with ctx.db.read() as conn, pytest.raises(AuthenticationError, match="not valid now"):
        authenticate_device(ctx, conn, device.enrollment["certificate_pem"], now=later)
    device.close()
