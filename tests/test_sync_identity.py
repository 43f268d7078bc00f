"""The node's fleet identity: files, renewal, enrollment and the sync loop's link states,
against a tiny real HTTPS fleet (real CA, real mTLS, real TUF root) in this process."""

from __future__ import annotations

import asyncio
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from securesystemslib.signer import CryptoSigner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from tuf.api.metadata import Metadata, Root

from edgeos.errors import AuthenticationError, ConfigError
from edgeos.node.process import node_process
from edgeos.node.status import collect_status
from edgeos.protocol.fleet import EnrollRequest, EnrollResponse, SyncRequest, SyncResponse
from edgeos.runtime import ModelRegistry
from edgeos.security import (
    CertificateAuthority,
    certificate_info,
    format_token,
    generate_key,
    new_secret,
    parse_token,
    peer_certificate,
    uvicorn_ssl_options,
    write_private_key,
    write_public_file,
)
from edgeos.settings import load_settings
from edgeos.state import Database
from edgeos.sync.apply import Applier
from edgeos.sync.enroll import device_key, enroll
from edgeos.sync.health import HealthProbe
from edgeos.sync.identity import (
    FleetPaths,
    Identity,
    load_identity,
    renewal_due,
    save_identity,
)
from edgeos.sync.inventory import collect_inventory
from edgeos.sync.loop import SyncLoop
from tests.loopback import UvicornThread
from tests.stored import stored_bytes


# -- files -------------------------------------------------------------------------------
def test_an_identity_is_saved_and_loaded_whole(tmp_path: Path) -> None:
    assert load_identity(tmp_path) is None
    identity = Identity("https://fleet.example:8480", "0190-dev", "stores", 1.0, 100.0, 400.0)
    save_identity(tmp_path, identity)
    assert load_identity(tmp_path) == identity
    path = FleetPaths.of(tmp_path).identity
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"fleet\.json cannot be read"):
        load_identity(tmp_path)
    path.write_text('{"url": "https://x"}')
    with pytest.raises(ConfigError, match="field 'device_id' is missing"):
        load_identity(tmp_path)


@pytest.mark.parametrize(
    ("now", "due"),
    [(100.0, False), (299.0, False), (300.0, True), (399.0, True), (500.0, True)],
)
def test_renewal_is_due_once_a_third_of_the_validity_is_left(now: float, due: bool) -> None:
    assert renewal_due(100.0, 400.0, now) is due  # valid 300 s: renew from 300 on


def test_the_device_key_and_id_are_made_once_and_kept(tmp_path: Path) -> None:
    paths = FleetPaths.of(tmp_path)
    key, device_id = device_key(paths)
    again, same_id = device_key(paths)
    assert same_id == device_id
    assert len(device_id) == 36
    assert again.public_key().public_numbers() == key.public_key().public_numbers()
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600


# -- a tiny fleet ------------------------------------------------------------------------
@dataclass
class TinyFleet:
    """Just enough of the fleet's API: the CA, enrollment and sync over mTLS."""

    ca: CertificateAuthority
    root: bytes
    url: str = ""
    secrets: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    syncs: list[SyncRequest] = field(default_factory=list)
    first_validity: timedelta = timedelta(seconds=30)

    def token(self) -> str:
        secret = new_secret()
        self.secrets.add(secret)
        return format_token(secret, self.ca.pin)

    def app(self) -> Starlette:
        def refuse(code: str, message: str, status: int) -> Response:
            return JSONResponse({"error": code, "message": message}, status_code=status)

        async def ca_pem(request: Request) -> Response:
            return PlainTextResponse(self.ca.cert_pem)

        async def enroll_device(request: Request) -> Response:
            body = EnrollRequest.model_validate_json(await request.body())
            secret, _ = parse_token(body.join_token)
            if secret not in self.secrets:
                return refuse(
                    "authentication", "the join token is unknown, expired or used up", 401
                )
            self.secrets.discard(secret)
            self.revoked.discard(body.device_id)
            issued = self.ca.issue_device(
                body.csr_pem, device_id=body.device_id, group="stores", validity=self.first_validity
            )
            answer = EnrollResponse(
                device_id=body.device_id, group="stores", certificate_pem=issued.pem,
                ca_pem=self.ca.cert_pem, tuf_root=self.root.decode(), sync_interval_s=0.2,
            )  # fmt: skip
            return Response(answer.model_dump_json(), media_type="application/json")

        async def sync(request: Request) -> Response:
            pem = peer_certificate(request.scope)
            if pem is None:
                return refuse("authentication", "a device client certificate is required", 401)
            device = certificate_info(pem).device_id
            if device in self.revoked:
                return refuse("authentication", f"device {device} is revoked", 401)
            body = SyncRequest.model_validate_json(await request.body())
            self.syncs.append(body)
            renewed = None
            if body.csr_pem is not None:
                renewed = self.ca.issue_device(
                    body.csr_pem, device_id=device, group="stores", validity=timedelta(hours=1)
                ).pem
            answer = SyncResponse(
                revision=0, desired=[], certificate_pem=renewed, sync_interval_s=0.2
            )
            return Response(answer.model_dump_json(), media_type="application/json")

        return Starlette(
            routes=[
                Route("/api/v1/ca", ca_pem),
                Route("/api/v1/enroll", enroll_device, methods=["POST"]),
                Route("/api/v1/sync", sync, methods=["POST"]),
            ]
        )


def tuf_root() -> bytes:
    signer = CryptoSigner.generate_ecdsa()
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    root = Root(version=1, expires=expires, consistent_snapshot=True)
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(signer.public_key, role)
    metadata = Metadata(root)
    metadata.sign(signer)
    return metadata.to_bytes()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyFleet]:
    keys = tmp_path_factory.mktemp("fleet") / "keys"
    ca = CertificateAuthority.create()
    ca.save(keys / "ca.key", keys / "ca.crt")
    server_key = generate_key()
    write_private_key(keys / "server.key", server_key)
    write_public_file(keys / "server.crt", ca.issue_server(server_key, ["127.0.0.1"]))
    tiny = TinyFleet(ca, tuf_root())
    options = uvicorn_ssl_options(keys / "server.key", keys / "server.crt", keys / "ca.crt")
    config = uvicorn.Config(tiny.app(), log_level="critical", lifespan="off", **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    tiny.url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    served = UvicornThread(config, sockets=[sock], name="tiny fleet")
    try:
        yield tiny
    finally:
        served.stop()
        sock.close()


# -- enrollment --------------------------------------------------------------------------
def test_enrollment_saves_a_whole_identity(fleet: TinyFleet, tmp_path: Path) -> None:
    identity = enroll(tmp_path, fleet.url, fleet.token(), collect_inventory())
    paths = FleetPaths.of(tmp_path)
    assert load_identity(tmp_path) == identity
    assert identity.group == "stores"
    assert certificate_info(paths.cert.read_text()).device_id == identity.device_id
    assert paths.ca.read_text() == fleet.ca.cert_pem
    assert (paths.tuf_metadata / "root.json").is_file()
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600


def test_a_spent_token_is_refused_with_the_fleets_reason_and_nothing_half_written(
    fleet: TinyFleet, tmp_path: Path
) -> None:
    token = fleet.token()
    enroll(tmp_path / "first", fleet.url, token, collect_inventory())
    with pytest.raises(AuthenticationError, match="unknown, expired or used up") as refused:
        enroll(tmp_path / "second", fleet.url, token, collect_inventory())
    assert token not in str(refused.value)
    paths = FleetPaths.of(tmp_path / "second")
    assert load_identity(tmp_path / "second") is None
    assert not paths.cert.exists()
    assert not paths.ca.exists()
    device_id = paths.device_id.read_text().strip()
    # The next attempt, with a good token, is the same device.
    assert (
        enroll(tmp_path / "second", fleet.url, fleet.token(), collect_inventory()).device_id
        == device_id
    )


# -- the sync loop -----------------------------------------------------------------------
async def wait_for(condition: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def stop(loop: SyncLoop) -> None:
    await loop.stop()
    # Let the TLS connections the client closed finish their shutdown before the event
    # loop goes (else a socket may be collected unclosed).
    await asyncio.sleep(0.1)


def sync_loop(data: Path, db: Database, fleet: TinyFleet, token: str | None, **kw: Any) -> SyncLoop:
    applier = Applier(db, ModelRegistry(db, data / "models"), data)
    return SyncLoop(
        data_dir=data, db=db, applier=applier, probe=HealthProbe(db), inventory=collect_inventory,
        fleet_url=fleet.url, join_token=token, wait_s=1.0, retry_cap_s=0.2, **kw,
    )  # fmt: skip


def test_the_sync_loop_enrolls_renews_is_revoked_and_comes_back(
    fleet: TinyFleet, tmp_path: Path
) -> None:
    data = tmp_path / "node"
    with Database(data / "node.db") as db:

        async def first_life() -> str:
            loop = sync_loop(data, db, fleet, fleet.token(), refused_retry_s=60.0)
            await loop.start()
            try:
                await wait_for(lambda: len(fleet.syncs) >= 3, "three syncs")
                assert loop.link.state == "online"
                device = loop.status()["device_id"]
                mine = [s for s in fleet.syncs if s.device_id == device]
                assert mine[0].inventory is not None  # first sync only
                assert all(s.inventory is None for s in mine[1:])
                assert mine[0].csr_pem is not None  # a 30 s certificate: renewed at once
                assert loop.identity is not None
                assert loop.identity.certificate_not_after > time.time() + 3000
                on_disk = certificate_info(FleetPaths.of(data).cert.read_text())
                assert on_disk.not_after == loop.identity.certificate_not_after

                fleet.revoked.add(device)
                await wait_for(lambda: loop.link.state == "revoked", "revoked")
                assert "is revoked" in (loop.link.last_error or "")
                seen = len(fleet.syncs)
                await asyncio.sleep(0.6)
                assert len(fleet.syncs) == seen, "a revoked node keeps asking"
                return str(device)
            finally:
                await stop(loop)

        device = asyncio.run(first_life())
        stopped = collect_status(db, load_settings({"data_dir": data}, environ={}), running=False)
        assert stopped.fleet_link is not None
        assert (stopped.fleet_link.link, stopped.fleet_link.stale) == ("revoked", True)
        assert stopped.fleet_link.device_id == device
        assert stopped.fleet.startswith("link revoked when the node stopped (device ")

        async def second_life() -> None:
            loop = sync_loop(data, db, fleet, fleet.token())
            assert loop.link.last_sync is not None  # from the last life, for the status
            seen = len(fleet.syncs)
            await loop.start()
            try:
                # Revoked: the new token enrolls the same device again, and it syncs.
                await wait_for(lambda: len(fleet.syncs) > seen, "back")
                # The first sync of this life (under load a second may already follow it).
                assert fleet.syncs[seen].device_id == device
                assert fleet.syncs[seen].inventory is not None  # a new enrollment: told again
                assert loop.link.state == "online"
            finally:
                await stop(loop)

        asyncio.run(second_life())


def test_an_unreachable_fleet_is_offline_and_an_expired_certificate_says_so(
    fleet: TinyFleet, tmp_path: Path
) -> None:
    data = tmp_path / "node"
    identity = enroll(data, fleet.url, fleet.token(), collect_inventory())
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    save_identity(
        data, Identity(**{**identity.__dict__, "url": f"https://127.0.0.1:{dead.getsockname()[1]}"})
    )
    with Database(data / "node.db") as db:

        async def offline() -> None:
            loop = sync_loop(data, db, fleet, None)
            loop.fleet_url = None
            await loop.start()
            try:
                await wait_for(
                    lambda: loop.link.last_error and "did not answer" in loop.link.last_error,
                    "offline",
                )
                assert loop.link.state == "offline"
            finally:
                await stop(loop)

        asyncio.run(offline())
        dead.close()
        save_identity(
            data, Identity(**{**identity.__dict__, "certificate_not_after": time.time() - 1})
        )

        async def expired() -> None:
            loop = sync_loop(data, db, fleet, None, refused_retry_s=60.0)
            await loop.start()
            try:
                await wait_for(lambda: loop.link.state == "certificate expired", "expired")
                assert "a new join token enrolls it again" in (loop.link.last_error or "")
            finally:
                await stop(loop)

        asyncio.run(expired())
        saved = orjson.loads(
            db.reader().execute("SELECT value FROM fleet_state WHERE key = 'link'").fetchone()[0]
        )
        assert saved["link_state"] == "certificate expired"


# -- a real node process -----------------------------------------------------------------
def test_a_node_run_with_fleet_flags_enrolls_and_keeps_no_token(
    fleet: TinyFleet, tmp_path: Path
) -> None:
    data = tmp_path / "node"
    token = fleet.token()
    secret = parse_token(token)[0]
    node = node_process(data)
    node.command += ["--fleet", fleet.url, "--join-token", token]
    with node:
        deadline = time.monotonic() + 20
        while True:
            doc = httpx.get(f"{node.url}/api/status", headers=node.headers, timeout=5).json()
            if doc["fleet_link"]["link"] == "online" and doc["fleet_link"]["last_sync"]:
                break
            assert time.monotonic() < deadline, doc["fleet_link"]
            time.sleep(0.05)
        log = node.log()
    link = doc["fleet_link"]
    assert link["group"] == "stores"
    assert link["url"] == fleet.url
    assert doc["fleet"].startswith(f"online (device {link['device_id']} in group stores")
    assert any(s.device_id == link["device_id"] for s in fleet.syncs)
    assert secret not in log
    for path in data.rglob("*"):
        if path.is_file():
            assert secret.encode() not in stored_bytes([path]), path
