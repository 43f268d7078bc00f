"""The fleet's TUF repository and the node's TUF client: real python-tuf on both sides,
real HTTP on loopback, and the attacks TUF exists to stop."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from securesystemslib.signer import CryptoSigner, Signer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from edgeos.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    EdgeOSError,
    InvalidRequestError,
    NotFoundError,
    UnavailableError,
    VerificationError,
)
from edgeos.fleet import tables
from edgeos.fleet.tuf_api import tuf_routes
from edgeos.fleet.tuf_keys import TufKeys, create_keys, load_online_keys, load_root_keys
from edgeos.fleet.tuf_repo import TufRepository, init_repository, rotate_root
from edgeos.fleet.tuf_store import MemoryTufStore, SqlTufStore, TufStore
from edgeos.node.process import free_port
from edgeos.sync.tuf_client import TufClient
from tests.loopback import UvicornThread

DEVICE_HEADER = "x-test-device"


# --- the fleet side: keys, a served repository -----------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> TufKeys:
    base = tmp_path_factory.mktemp("tuf-keys")
    return create_keys(base / "keys", base / "root-keys", root_keys=3, threshold=2)


@dataclass
class Served:
    """One uvicorn server for the module; each test points it at its own repository."""

    base_url: str
    repo: TufRepository | None = None
    requests: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    port = free_port()
    served = Served(base_url=f"http://127.0.0.1:{port}")

    def current() -> TufRepository:
        assert served.repo is not None, "the test did not set a repository"
        return served.repo

    async def authorize(request: Request) -> object:
        # Stands in for the fleet's mTLS device check.
        served.requests.append(request.url.path)
        if request.headers.get(DEVICE_HEADER) != "enrolled":
            raise AuthenticationError("no device certificate")
        return None

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EdgeOSError)
        body = {"error": type(exc).__name__, "message": str(exc)}
        return JSONResponse(body, status_code=exc.http_status)

    app = Starlette(
        routes=tuf_routes(current, authorize), exception_handlers={EdgeOSError: on_error}
    )
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none"
    )
    server = UvicornThread(config, name="the TUF server")
    try:
        yield served
    finally:
        server.stop()


@dataclass
class Fleet:
    store: TufStore
    repo: TufRepository
    root: bytes  # the root a node gets at enrollment
    keys: TufKeys


def _fleet(store: TufStore, keys: TufKeys, served: Served) -> Fleet:
    root = init_repository(store, keys.root, keys.threshold, keys.online)
    repo = TufRepository(store, keys.online)
    served.repo = repo
    return Fleet(store, repo, root, keys)


@pytest.fixture
def fleet(keys: TufKeys, server: Served) -> Fleet:
    return _fleet(MemoryTufStore(), keys, server)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    tables.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sql_fleet(keys: TufKeys, server: Served, engine: sa.Engine) -> Fleet:
    return _fleet(SqlTufStore(engine), keys, server)


# --- the node side ---------------------------------------------------------------------


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0, headers={DEVICE_HEADER: "enrolled"}) as client:
        yield client


def _node(tmp_path: Path, served: Served, http: httpx.Client, name: str = "node") -> TufClient:
    return TufClient(tmp_path / name / "tuf", tmp_path / name / "targets", served.base_url, http)


@pytest.fixture
def node(tmp_path: Path, server: Served, http: httpx.Client) -> TufClient:
    return _node(tmp_path, server, http)


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


MODEL = "models/stockout/1.tar.gz"
MODEL_2 = "models/stockout/2.tar.gz"


def _custom(path: str) -> dict[str, str]:
    kind, name, version = path.split("/")
    return {"kind": kind.removesuffix("s"), "name": name, "version": version.split(".")[0]}


# --- forging helpers: what an attacker with write access to the store could serve -------


def _latest(store: TufStore, role: str) -> tuple[int, bytes]:
    latest = store.latest(role)
    assert latest is not None
    return latest


def _put(store: TufStore, md: Metadata[Root] | Metadata[Targets] | Metadata[Snapshot]
         | Metadata[Timestamp], signers: list[Signer]) -> bytes:  # fmt: skip
    for signer in signers:
        md.sign(signer, append=True)
    data = md.to_bytes()
    store.put_metadata(md.signed.type, md.signed.version, data, md.signed.expires.timestamp())
    return data


def _later(hours: float = 24) -> datetime:
    return datetime.now(UTC) + timedelta(hours=hours)


# --- the happy path --------------------------------------------------------------------


def test_publish_then_download_and_see_the_next_publish(
    fleet: Fleet, node: TufClient, tmp_path: Path
) -> None:
    info = fleet.repo.add_target(MODEL, b"model one", _custom(MODEL))
    assert (info.path, info.length) == (MODEL, 9)

    assert node.bootstrap(fleet.root) is True
    node.refresh()
    assert node.download(MODEL) == b"model one"
    assert node.info(MODEL) == {"kind": "model", "name": "stockout", "version": "1"}
    with pytest.raises(NotFoundError):
        node.download(MODEL_2)

    fleet.repo.add_target(MODEL_2, b"model two", _custom(MODEL_2))
    node.refresh()
    assert node.download(MODEL_2) == b"model two"
    assert set(fleet.repo.targets()) == {MODEL, MODEL_2}
    assert len(_files(tmp_path / "node" / "targets")) == 2

    # A verified target is served from the node's cache: the fleet's copy is not needed.
    assert isinstance(fleet.store, MemoryTufStore)
    fleet.store.blobs.clear()
    assert node.download(MODEL) == b"model one"
    assert node.download_file(MODEL).read_bytes() == b"model one"


def test_publishing_is_idempotent_and_a_version_never_changes(fleet: Fleet) -> None:
    first = fleet.repo.add_target(MODEL, b"bytes", _custom(MODEL))
    version = _latest(fleet.store, "targets")[0]
    assert fleet.repo.add_target(MODEL, b"bytes", _custom(MODEL)) == first
    assert _latest(fleet.store, "targets")[0] == version
    with pytest.raises(ConflictError, match="new version"):
        fleet.repo.add_target(MODEL, b"other bytes", _custom(MODEL))
    for bad in ("../etc/passwd", "/abs", "a//b", "models/x/"):
        with pytest.raises(InvalidRequestError):
            fleet.repo.add_target(bad, b"x", {})


def test_files_by_the_names_a_client_asks_for(fleet: Fleet, server: Served) -> None:
    info = fleet.repo.add_target(MODEL, b"payload", _custom(MODEL))
    repo = fleet.repo
    assert repo.metadata_file("1.root.json") == repo.trusted_root() == fleet.root
    assert repo.metadata_file("timestamp.json") == _latest(fleet.store, "timestamp")[1]
    assert repo.metadata_file("2.targets.json") == fleet.store.get("targets", 2)
    assert repo.metadata_file("2.snapshot.json") == fleet.store.get("snapshot", 2)
    for name in ("2.root.json", "0.root.json", "x.json", "3.targets.json", "../root.json"):
        with pytest.raises(NotFoundError):
            repo.metadata_file(name)
    assert repo.target_file(f"models/stockout/{info.sha256}.1.tar.gz") == b"payload"
    for name in (f"models/stockout/{'0' * 64}.1.tar.gz", MODEL, f"{info.sha256}.1.tar.gz"):
        with pytest.raises(NotFoundError):
            repo.target_file(name)

    # Over HTTP: the next root's absence is a 404, how a client knows it has the newest.
    headers = {DEVICE_HEADER: "enrolled"}
    missing = httpx.get(f"{server.base_url}/tuf/metadata/2.root.json", headers=headers)
    assert missing.status_code == 404
    assert missing.json()["error"] == "NotFoundError"
    ts = httpx.get(f"{server.base_url}/tuf/metadata/timestamp.json", headers=headers)
    assert ts.headers["cache-control"] == "no-store"


def test_a_caller_the_fleet_refuses_gets_nothing(
    fleet: Fleet, server: Served, tmp_path: Path
) -> None:
    with httpx.Client(timeout=5.0) as anonymous:
        stranger = _node(tmp_path, server, anonymous, "stranger")
        stranger.bootstrap(fleet.root)
        with pytest.raises(UnavailableError, match="HTTP 401: no device certificate"):
            stranger.refresh()


def test_a_fleet_that_does_not_answer_is_unavailable(fleet: Fleet, tmp_path: Path) -> None:
    with httpx.Client(timeout=2.0) as http:
        client = TufClient(tmp_path / "m", tmp_path / "t", f"http://127.0.0.1:{free_port()}", http)
        client.bootstrap(fleet.root)
        with pytest.raises(UnavailableError) as caught:
            client.refresh()
    assert caught.value.retryable


# --- attacks ---------------------------------------------------------------------------


@pytest.mark.parametrize("tampered", [b"MODEL ONE", b"model one, and a payload"])
def test_tampered_target_bytes_are_refused(
    sql_fleet: Fleet, node: TufClient, engine: sa.Engine, tampered: bytes, tmp_path: Path
) -> None:
    info = sql_fleet.repo.add_target(MODEL, b"model one", _custom(MODEL))
    with engine.begin() as conn:
        conn.execute(
            sa.update(tables.blobs)
            .where(tables.blobs.c.sha256 == info.sha256)
            .values(data=tampered)
        )
    node.bootstrap(sql_fleet.root)
    with pytest.raises(VerificationError, match=rf"TUF refused target {MODEL}: .*tampered"):
        node.download(MODEL)
    assert _files(tmp_path / "node" / "targets") == []


@pytest.mark.parametrize("attack", ["old timestamp", "new timestamp naming an old snapshot"])
def test_rollback_is_refused(fleet: Fleet, node: TufClient, attack: str) -> None:
    fleet.repo.add_target(MODEL, b"one", _custom(MODEL))
    fleet.repo.add_target(MODEL_2, b"two", _custom(MODEL_2))
    node.bootstrap(fleet.root)
    node.refresh()  # the node has seen timestamp, snapshot and targets version 3
    store = fleet.store
    assert isinstance(store, MemoryTufStore)
    if attack == "old timestamp":
        # The fleet database restored from a backup taken before the last publish.
        for role in ("timestamp", "snapshot", "targets"):
            del store.metadata[(role, 3)]
    else:
        old_snapshot = store.get("snapshot", 2)
        assert old_snapshot is not None
        timestamp = Timestamp(
            version=4,
            expires=_later(),
            snapshot_meta=MetaFile.from_data(2, old_snapshot, ["sha256"]),
        )
        _put(store, Metadata(timestamp), [fleet.keys.online.timestamp])
    with pytest.raises(VerificationError, match="rollback"):
        node.refresh()


def test_expired_timestamp_is_refused_until_the_fleet_re_signs(
    fleet: Fleet, node: TufClient
) -> None:
    fleet.repo.add_target(MODEL, b"one", _custom(MODEL))
    version, data = _latest(fleet.store, "timestamp")
    stale = Metadata[Timestamp].from_bytes(data)
    stale.signed.version = version + 1
    stale.signed.expires = datetime.now(UTC) - timedelta(hours=1)
    _put(fleet.store, stale, [fleet.keys.online.timestamp])

    node.bootstrap(fleet.root)
    with pytest.raises(VerificationError, match=r"refused timestamp: it has expired at .*freeze"):
        node.refresh()

    # The fleet's periodic refresher re-signs it, and the node carries on.
    assert fleet.repo.refresh_timestamp() is True
    node.refresh()
    assert node.download(MODEL) == b"one"


def test_online_roles_are_re_signed_past_half_their_life(fleet: Fleet, node: TufClient) -> None:
    repo = fleet.repo
    assert repo.refresh_timestamp() is False
    assert repo.refresh_timestamp(_later(hours=13)) is True
    assert _latest(fleet.store, "timestamp")[0] == 2
    assert repo.refresh_timestamp(_later(hours=13)) is False
    assert repo.refresh_timestamp(_later(hours=24 * 4)) is True  # snapshot: 7 days
    assert [_latest(fleet.store, r)[0] for r in ("targets", "snapshot", "timestamp")] == [1, 2, 3]
    assert repo.refresh_timestamp(_later(hours=24 * 16)) is True  # targets: 30 days
    assert [_latest(fleet.store, r)[0] for r in ("targets", "snapshot", "timestamp")] == [2, 3, 4]
    assert repo.expires("timestamp") > _later(hours=24 * 16)
    node.bootstrap(fleet.root)
    node.refresh()


@pytest.mark.parametrize("swap", ["old targets under the new version", "new targets as old"])
def test_mix_and_match_is_refused(
    sql_fleet: Fleet, node: TufClient, engine: sa.Engine, swap: str
) -> None:
    sql_fleet.repo.add_target(MODEL, b"one", _custom(MODEL))
    sql_fleet.repo.add_target(MODEL_2, b"two", _custom(MODEL_2))
    meta = tables.tuf_metadata
    with engine.begin() as conn:
        data = {
            v: conn.execute(
                sa.select(meta.c.data).where(meta.c.role == "targets", meta.c.version == v)
            ).scalar_one()
            for v in (2, 3)
        }
        if swap == "old targets under the new version":
            victim, served = 3, data[2]
        else:
            # Snapshot 2 is the newest served, and names targets 2; targets 3 comes instead.
            conn.execute(sa.delete(meta).where(meta.c.version == 3))
            victim, served = 2, data[3]
        conn.execute(
            sa.update(meta)
            .where(meta.c.role == "targets", meta.c.version == victim)
            .values(data=served)
        )
    node.bootstrap(sql_fleet.root)
    with pytest.raises(VerificationError, match=rf"refused {victim}\.targets\.json: .*hash"):
        node.refresh()


@pytest.mark.parametrize("forged", ["targets", "the whole chain"])
def test_metadata_signed_by_a_key_root_does_not_name_is_refused(
    fleet: Fleet, node: TufClient, forged: str, tmp_path: Path
) -> None:
    fleet.repo.add_target(MODEL, b"one", _custom(MODEL))
    rogue = CryptoSigner.generate_ecdsa()
    online = fleet.keys.online
    store = fleet.store

    targets = Metadata[Targets].from_bytes(_latest(store, "targets")[1])
    targets.signed.version += 1
    evil = b"evil agent"
    targets.signed.targets[MODEL_2] = TargetFile.from_data(MODEL_2, evil, ["sha256"])
    store.put_blob(targets.signed.targets[MODEL_2].hashes["sha256"], evil)
    targets_bytes = _put(store, targets, [rogue])

    snapshot = Metadata[Snapshot].from_bytes(_latest(store, "snapshot")[1])
    snapshot.signed.version += 1
    snapshot.signed.meta["targets.json"] = MetaFile.from_data(
        targets.signed.version, targets_bytes, ["sha256"]
    )
    snapshot_bytes = _put(store, snapshot, [online.snapshot if forged == "targets" else rogue])

    timestamp = Metadata[Timestamp].from_bytes(_latest(store, "timestamp")[1])
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = MetaFile.from_data(
        snapshot.signed.version, snapshot_bytes, ["sha256"]
    )
    _put(store, timestamp, [online.timestamp if forged == "targets" else rogue])

    node.bootstrap(fleet.root)
    refused = "targets" if forged == "targets" else "timestamp"
    with pytest.raises(VerificationError, match=rf"refused {refused}: .*forged"):
        node.download(MODEL_2)
    assert _files(tmp_path / "node" / "targets") == []


def test_root_needs_its_threshold_of_keys(
    keys: TufKeys, server: Served, http: httpx.Client, tmp_path: Path
) -> None:
    assert (len(keys.root), keys.threshold) == (3, 2)
    fleet = _fleet(MemoryTufStore(), keys, server)
    fleet.repo.add_target(MODEL, b"one", _custom(MODEL))
    node = _node(tmp_path, server, http)
    node.bootstrap(fleet.root)
    node.refresh()

    # The repository will not publish a root its nodes would refuse...
    with pytest.raises(VerificationError, match="1 of the 2 keys of root version 1"):
        rotate_root(fleet.store, keys.root[:1], keys.root[:1], 1)
    assert _latest(fleet.store, "root")[0] == 1

    # ...and a node refuses one anyway, say from a thief holding one root key.
    takeover = Metadata[Root].from_bytes(fleet.root)
    for keyid in list(takeover.signed.roles["root"].keyids):
        takeover.signed.revoke_key(keyid, "root")
    takeover.signed.add_key(keys.root[0].public_key, "root")
    takeover.signed.roles["root"].threshold = 1
    takeover.signed.version = 2
    _put(fleet.store, takeover, [keys.root[0]])
    with pytest.raises(VerificationError, match=r"refused root: .*forged"):
        node.refresh()


def test_root_rotation_reaches_the_node_through_the_chain(
    keys: TufKeys, server: Served, http: httpx.Client, tmp_path: Path
) -> None:
    fleet = _fleet(MemoryTufStore(), keys, server)
    fleet.repo.add_target(MODEL, b"one", _custom(MODEL))
    node = _node(tmp_path, server, http)
    node.bootstrap(fleet.root)

    new_keys = [CryptoSigner.generate_ecdsa() for _ in range(2)]
    rotate_root(fleet.store, keys.root[:2], new_keys, 2)
    node.refresh()
    assert node.download(MODEL) == b"one"
    trusted = Metadata[Root].from_bytes((tmp_path / "node" / "tuf" / "root.json").read_bytes())
    assert trusted.signed.version == 2
    assert set(trusted.signed.roles["root"].keyids) == {k.public_key.keyid for k in new_keys}

    # The enrollment root never replaces the newer root the chain led to.
    assert node.bootstrap(fleet.root) is False
    trusted = Metadata[Root].from_bytes((tmp_path / "node" / "tuf" / "root.json").read_bytes())
    assert trusted.signed.version == 2

    # Nor is a root trusted that is not signed by its own keys.
    unsigned = Metadata[Root].from_bytes(fleet.root)
    unsigned.signatures.clear()
    with pytest.raises(VerificationError, match="forged"):
        _node(tmp_path, server, http, "other").bootstrap(unsigned.to_bytes())


def test_an_expired_root_stops_the_node_until_the_fleet_renews_it(
    fleet: Fleet, node: TufClient
) -> None:
    node.bootstrap(fleet.root)
    expired = Metadata[Root].from_bytes(fleet.root)
    expired.signed.version = 2
    expired.signed.expires = datetime.now(UTC) - timedelta(minutes=1)
    _put(fleet.store, expired, list(fleet.keys.root[:2]))
    with pytest.raises(VerificationError, match=r"refused root: it has expired at .*offline"):
        node.refresh()
    rotate_root(fleet.store, fleet.keys.root[:2], fleet.keys.root, 2)
    node.refresh()


# --- keys ------------------------------------------------------------------------------


def test_keys_are_private_never_overwritten_and_must_match_the_root(tmp_path: Path) -> None:
    made = create_keys(tmp_path / "keys", tmp_path / "root-keys", root_keys=2, threshold=2)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in _files(tmp_path))
    assert files == [
        "keys/tuf/snapshot.key",
        "keys/tuf/targets.key",
        "keys/tuf/timestamp.key",
        "root-keys/root-1.key",
        "root-keys/root-2.key",
    ]
    assert all((tmp_path / f).stat().st_mode & 0o777 == 0o600 for f in files)
    with pytest.raises(ConflictError, match="refusing to overwrite"):
        create_keys(tmp_path / "keys", tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="threshold of 3"):
        create_keys(tmp_path / "k2", tmp_path / "r2", root_keys=2, threshold=3)

    online = load_online_keys(tmp_path / "keys")
    assert online.targets.public_key == made.online.targets.public_key
    root = load_root_keys(tmp_path / "root-keys")
    assert [k.public_key for k in root] == [k.public_key for k in made.root]
    with pytest.raises(ConfigError, match="missing"):
        load_online_keys(tmp_path / "nowhere")

    store = MemoryTufStore()
    with pytest.raises(ConfigError, match="not initialized"):
        TufRepository(store, online)
    init_repository(store, root, made.threshold, online)
    with pytest.raises(ConflictError):
        init_repository(store, root, made.threshold, online)
    others = create_keys(tmp_path / "k3", tmp_path / "r3").online
    with pytest.raises(ConfigError, match="online targets key"):
        TufRepository(store, others)


# --- the SQL store: replicas publishing at once ----------------------------------------


def _publish_concurrently(engines: Sequence[sa.Engine], keys: TufKeys, served: Served,
                          http: httpx.Client, tmp_path: Path) -> None:  # fmt: skip
    """Two replicas (one engine each) publish at once: every publish lands, in order."""
    init_repository(SqlTufStore(engines[0]), keys.root, keys.threshold, keys.online)
    replicas = [TufRepository(SqlTufStore(e), keys.online) for e in engines]
    per_replica = 4
    start = threading.Barrier(len(replicas))
    errors: list[BaseException] = []

    def publish(index: int, repo: TufRepository) -> None:
        try:
            start.wait(5)
            for n in range(per_replica):
                path = f"agents/r{index}/{n}.tar.gz"
                repo.add_target(path, f"replica {index} #{n}".encode(), _custom(path))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i, r)) for i, r in enumerate(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []

    total = 1 + per_replica * len(replicas)
    meta = tables.tuf_metadata
    with engines[0].connect() as conn:
        for role in ("targets", "snapshot", "timestamp"):
            versions = conn.execute(
                sa.select(meta.c.version).where(meta.c.role == role).order_by(meta.c.version)
            ).scalars()
            assert list(versions) == list(range(1, total + 1)), role

    served.repo = replicas[1]
    node = _node(tmp_path, served, http)
    node.bootstrap(replicas[0].trusted_root())
    for index in range(len(replicas)):
        for n in range(per_replica):
            path = f"agents/r{index}/{n}.tar.gz"
            assert node.download(path) == f"replica {index} #{n}".encode()


def test_sqlite_store_serializes_replicas(
    keys: TufKeys, server: Served, http: httpx.Client, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    engines = [sa.create_engine(url), sa.create_engine(url)]
    tables.metadata.create_all(engines[0])
    try:
        _publish_concurrently(engines, keys, server, http, tmp_path)
    finally:
        for engine in engines:
            engine.dispose()


def test_postgres_store_serializes_replicas(
    keys: TufKeys, server: Served, http: httpx.Client, tmp_path: Path
) -> None:
    url = os.environ.get("EDGEOS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("EDGEOS_TEST_POSTGRES_URL is not set: no PostgreSQL to test against")
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    schema = f"tuf_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engines = [
        sa.create_engine(url).execution_options(schema_translate_map={None: schema})
        for _ in range(2)
    ]
    try:
        tables.metadata.create_all(engines[0])
        _publish_concurrently(engines, keys, server, http, tmp_path)
    finally:
        for engine in engines:
            engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
