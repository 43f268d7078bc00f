"""The fleet's TUF repository: its keys, its storage, and the signed metadata it serves.

The layout is the one in docs/fleet.md ("Artifacts and TUF"): consistent snapshots, so
metadata is served as ``N.root.json``, ``N.targets.json``, ``N.snapshot.json`` and
``timestamp.json``, and a target ``DIR/NAME`` as ``DIR/SHA256.NAME``. Every version of
every role and the bytes of every target live in a :class:`TufStore` (the fleet database
in production), so replicas sharing the database serve one repository and publish
without overwriting each other.

Root is signed by offline root keys (a threshold of them); targets, snapshot and
timestamp by one online key each, kept with the server. Signed versions are never
rewritten: every change, re-signing included, is a new version.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from edgeos.errors import (
    ConfigError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    VerificationError,
)
from edgeos.fleet.tables import blobs, fleet_state, tuf_metadata

ONLINE_ROLES: tuple[str, ...] = ("targets", "snapshot", "timestamp")
"""The roles signed by keys kept with the server."""

DEFAULT_TIMESTAMP_EXPIRY = timedelta(days=1)
DEFAULT_SNAPSHOT_EXPIRY = timedelta(days=7)
DEFAULT_TARGETS_EXPIRY = timedelta(days=30)
DEFAULT_ROOT_EXPIRY = timedelta(days=365)

# The four top-level roles, as tuf.api.metadata.Metadata is generic over them.
_T = TypeVar("_T", Root, Timestamp, Snapshot, Targets)
_ROLES = frozenset({Root.type, *ONLINE_ROLES})

# Target paths become URL paths and file names on the node: plain segments only, so no
# "..", no empty segment and nothing a URL would need to escape.
_TARGET_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9][A-Za-z0-9._+-]*)*$")
_METADATA_NAME = re.compile(r"^(?:([1-9][0-9]{0,9})\.)?(root|timestamp|snapshot|targets)\.json$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# --- keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OnlineSigners:
    """The online keys: one signer for each of targets, snapshot and timestamp."""

    targets: Signer
    snapshot: Signer
    timestamp: Signer

    def for_role(self, role: str) -> Signer:
        """The signer of ``role`` (one of :data:`ONLINE_ROLES`)."""
        if role not in ONLINE_ROLES:
            raise ValueError(f"{role!r} is not an online TUF role")
        signer: Signer = getattr(self, role)
        return signer


@dataclass(frozen=True)
class TufKeys:
    """Keys made by :func:`create_keys`: the root signers, their threshold, the online keys."""

    root: tuple[Signer, ...]
    threshold: int
    online: OnlineSigners


def _online_key_path(keys_dir: Path, role: str) -> Path:
    return keys_dir / "tuf" / f"{role}.key"


def _root_key_path(root_keys_dir: Path, index: int) -> Path:
    return root_keys_dir / f"root-{index}.key"


def _check_threshold(keys: int, threshold: int) -> None:
    if not 1 <= threshold <= keys:
        raise ConfigError(
            f"a TUF root threshold of {threshold} needs between 1 and {keys} keys "
            f"(there are {keys} root keys)"
        )


def create_keys(
    keys_dir: Path, root_keys_dir: Path, *, root_keys: int = 1, threshold: int = 1
) -> TufKeys:
    """Make the TUF keys: EC P-256 PEM files, written 0600, never over existing ones.

    Online keys go to ``keys_dir/tuf/{targets,snapshot,timestamp}.key``, root keys to
    ``root_keys_dir/root-N.key`` (N from 1); the root keys are meant to leave the server.
    """
    if root_keys < 1:
        raise ConfigError(f"a TUF root needs at least one key, not {root_keys}")
    _check_threshold(root_keys, threshold)
    online_paths = {role: _online_key_path(keys_dir, role) for role in ONLINE_ROLES}
    root_paths = [_root_key_path(root_keys_dir, i) for i in range(1, root_keys + 1)]
    existing = [p for p in [*online_paths.values(), *root_paths] if p.exists()]
    if root_keys_dir.is_dir():
        # A leftover root key from an earlier set would be mistaken for one of the new set.
        existing += sorted(p for p in root_keys_dir.glob("root-*.key") if p not in existing)
    if existing:
        names = ", ".join(str(p) for p in existing)
        raise ConflictError(f"TUF keys exist already, refusing to overwrite them: {names}")

    online = {role: CryptoSigner.generate_ecdsa() for role in ONLINE_ROLES}
    root = [CryptoSigner.generate_ecdsa() for _ in root_paths]
    for role, path in online_paths.items():
        _write_key(path, online[role])
    for signer, path in zip(root, root_paths, strict=True):
        _write_key(path, signer)
    return TufKeys(
        root=tuple(root),
        threshold=threshold,
        online=OnlineSigners(online["targets"], online["snapshot"], online["timestamp"]),
    )


def load_online_keys(keys_dir: Path) -> OnlineSigners:
    """The online signers from ``keys_dir/tuf``; a missing or unreadable key is a ConfigError."""
    loaded = {role: _read_key(_online_key_path(keys_dir, role)) for role in ONLINE_ROLES}
    return OnlineSigners(loaded["targets"], loaded["snapshot"], loaded["timestamp"])


def load_root_keys(root_keys_dir: Path) -> list[Signer]:
    """Every ``root-N.key`` in ``root_keys_dir``, in the order of N."""

    def index(path: Path) -> int:
        return int(path.stem.removeprefix("root-"))

    paths = [p for p in root_keys_dir.glob("root-*.key") if p.stem[5:].isdigit()]
    if not paths:
        raise ConfigError(f"no TUF root keys (root-N.key) in {root_keys_dir}")
    return [_read_key(p) for p in sorted(paths, key=index)]


def _write_key(path: Path, signer: CryptoSigner) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # O_EXCL: a key that appeared since the check above is still not overwritten.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(signer.private_bytes)


def _read_key(path: Path) -> CryptoSigner:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"TUF key {path} is missing") from None
    except OSError as exc:
        raise ConfigError(f"TUF key {path} cannot be read: {exc}") from exc
    try:
        return CryptoSigner(load_pem_private_key(pem, password=None))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"TUF key {path} is not a usable private key: {exc}") from exc


# --- storage --------------------------------------------------------------------------


class TufStore(Protocol):
    """Where the repository keeps metadata versions and target bytes.

    Writers call the other methods inside :meth:`transaction`, which serializes them
    across threads and, for a shared database, across replicas.
    """

    def transaction(self) -> AbstractContextManager[None]:
        """Hold the writer lock; everything done inside is committed together."""
        ...

    def latest(self, role: str) -> tuple[int, bytes] | None:
        """The highest version of ``role`` and its bytes, or None when there is none."""
        ...

    def get(self, role: str, version: int) -> bytes | None:
        """One version of ``role``, or None."""
        ...

    def put_metadata(self, role: str, version: int, data: bytes, expires_at: float) -> None:
        """Store a new version; an existing (role, version) is a ConflictError."""
        ...

    def put_blob(self, sha256: str, data: bytes) -> None:
        """Store target bytes under their SHA-256 (kept as they are if present)."""
        ...

    def get_blob(self, sha256: str) -> bytes | None:
        """Target bytes by SHA-256, or None."""
        ...


class MemoryTufStore:
    """A :class:`TufStore` in memory: for tests, and the reference for the others."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.metadata: dict[tuple[str, int], bytes] = {}
        self.blobs: dict[str, bytes] = {}

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the store's lock (reentrant, like nesting in one database transaction).

        Not atomic: a failure halfway leaves what was put. The repository puts the
        timestamp last, so readers never follow a timestamp to missing files.
        """
        with self._lock:
            yield

    def latest(self, role: str) -> tuple[int, bytes] | None:
        """The highest version of ``role`` and its bytes, or None."""
        with self._lock:
            versions = [v for (r, v) in self.metadata if r == role]
            if not versions:
                return None
            top = max(versions)
            return top, self.metadata[(role, top)]

    def get(self, role: str, version: int) -> bytes | None:
        """One version of ``role``, or None."""
        with self._lock:
            return self.metadata.get((role, version))

    def put_metadata(self, role: str, version: int, data: bytes, expires_at: float) -> None:
        """Store a new version of ``role``; never replaces one."""
        with self._lock:
            if (role, version) in self.metadata:
                raise ConflictError(f"TUF {role} version {version} exists already")
            self.metadata[(role, version)] = data

    def put_blob(self, sha256: str, data: bytes) -> None:
        """Store target bytes under their hash."""
        with self._lock:
            self.blobs.setdefault(sha256, data)

    def get_blob(self, sha256: str) -> bytes | None:
        """Target bytes by hash, or None."""
        with self._lock:
            return self.blobs.get(sha256)


# Key of the PostgreSQL advisory lock that serializes TUF writers ("edgeTUF\x01").
_PG_LOCK_KEY = 0x6564_6765_5455_4601
_SQL_LOCK_ROW = "tuf_lock"


class SqlTufStore:
    """A :class:`TufStore` over the fleet database (tables ``tuf_metadata`` and ``blobs``).

    :meth:`transaction` takes a database-wide writer lock: ``pg_advisory_xact_lock`` on
    PostgreSQL, elsewhere a write to the ``fleet_state`` row ``tuf_lock`` (on SQLite the
    first write of a transaction takes the database's write lock). Calls made inside the
    transaction, on the same thread, run on its connection (see :meth:`connection`).
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        read: Callable[[], AbstractContextManager[sa.Connection]] | None = None,
    ) -> None:
        """``read``, if given, opens a connection for reads outside a transaction (one
        that takes no write lock, say); by default ``engine.connect()``."""
        self._engine = engine
        self._read = engine.connect if read is None else read
        self._local = threading.local()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One database transaction holding the TUF writer lock; reentrant per thread."""
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        with self._engine.begin() as conn:
            self._lock(conn)
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    @staticmethod
    def _lock(conn: sa.Connection) -> None:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
            return
        # The first statement is a write, so the transaction holds the write lock before
        # it reads anything and sees every version committed before it.
        bumped = conn.execute(
            sa.update(fleet_state)
            .where(fleet_state.c.key == _SQL_LOCK_ROW)
            .values(value=fleet_state.c.value + 1)
        )
        if bumped.rowcount == 0:
            conn.execute(sa.insert(fleet_state).values(key=_SQL_LOCK_ROW, value=1))

    @contextmanager
    def connection(self) -> Iterator[sa.Connection]:
        """The connection of this thread's :meth:`transaction`, else a new transaction.

        Lets a caller write its own rows (the ``artifacts`` row of a publish, say) in
        the same transaction as the TUF metadata they go with.
        """
        conn: sa.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self._engine.begin() as fresh:
            yield fresh

    @contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        conn: sa.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self._read() as fresh:
            yield fresh

    def latest(self, role: str) -> tuple[int, bytes] | None:
        """The highest version of ``role`` and its bytes, or None."""
        query = (
            sa.select(tuf_metadata.c.version, tuf_metadata.c.data)
            .where(tuf_metadata.c.role == role)
            .order_by(tuf_metadata.c.version.desc())
            .limit(1)
        )
        with self._reading() as conn:
            row = conn.execute(query).first()
        return None if row is None else (int(row.version), bytes(row.data))

    def get(self, role: str, version: int) -> bytes | None:
        """One version of ``role``, or None."""
        query = sa.select(tuf_metadata.c.data).where(
            tuf_metadata.c.role == role, tuf_metadata.c.version == version
        )
        with self._reading() as conn:
            data = conn.execute(query).scalar_one_or_none()
        return None if data is None else bytes(data)

    def put_metadata(self, role: str, version: int, data: bytes, expires_at: float) -> None:
        """Insert a new version of ``role``; never replaces one."""
        row = {"role": role, "version": version, "data": data, "expires_at": expires_at}
        try:
            with self.connection() as conn:
                conn.execute(sa.insert(tuf_metadata).values(**row))
        except sa.exc.IntegrityError as exc:
            raise ConflictError(f"TUF {role} version {version} exists already") from exc

    def put_blob(self, sha256: str, data: bytes) -> None:
        """Insert target bytes under their hash, unless present."""
        with self.connection() as conn:
            present = conn.execute(
                sa.select(blobs.c.sha256).where(blobs.c.sha256 == sha256)
            ).first()
            if present is None:
                conn.execute(sa.insert(blobs).values(sha256=sha256, data=data))

    def get_blob(self, sha256: str) -> bytes | None:
        """Target bytes by hash, or None."""
        with self._reading() as conn:
            data = conn.execute(
                sa.select(blobs.c.data).where(blobs.c.sha256 == sha256)
            ).scalar_one_or_none()
        return None if data is None else bytes(data)


# --- metadata -------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetInfo:
    """A published target: its path, the SHA-256 and length of its bytes, its custom data."""

    path: str
    sha256: str
    length: int
    custom: dict[str, Any] = field(default_factory=dict)


def _target_info(target: TargetFile) -> TargetInfo:
    custom = target.custom
    return TargetInfo(
        path=target.path,
        sha256=target.hashes["sha256"],
        length=target.length,
        custom=dict(custom) if isinstance(custom, Mapping) else {},
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _sign(signed: _T, signers: Sequence[Signer]) -> bytes:
    md = Metadata(signed)
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes()


def _parse(role_type: type[_T], data: bytes) -> _T:
    signed = Metadata[_T].from_bytes(data).signed
    if not isinstance(signed, role_type):
        raise AssertionError(f"stored {role_type.type} metadata holds {signed.type}")
    return signed


def _check_expiry(name: str, value: timedelta) -> None:
    if value <= timedelta(0):
        raise ConfigError(f"TUF {name} expiry must be positive, not {value}")


def _root_signed_enough(root_bytes: bytes, previous: Root | None) -> None:
    md = Metadata[Root].from_bytes(root_bytes)
    result = md.signed.get_root_verification_result(previous, md.signed_bytes, md.signatures)
    if result.verified:
        return
    own = f"{len(result.second.signed)} of the {result.second.threshold} keys it names"
    if previous is not None:
        own += (
            f" and {len(result.first.signed)} of the {result.first.threshold} keys of "
            f"root version {previous.version}"
        )
    raise VerificationError(
        f"TUF root version {md.signed.version} would be refused by every node: it needs "
        f"signatures from a threshold of its own root keys and of the previous root's, and "
        f"has {own}; nothing was stored"
    )


def init_repository(
    store: TufStore,
    root_signers: Sequence[Signer],
    threshold: int,
    online: OnlineSigners,
    *,
    timestamp_expiry: timedelta = DEFAULT_TIMESTAMP_EXPIRY,
    snapshot_expiry: timedelta = DEFAULT_SNAPSHOT_EXPIRY,
    targets_expiry: timedelta = DEFAULT_TARGETS_EXPIRY,
    root_expiry: timedelta = DEFAULT_ROOT_EXPIRY,
) -> bytes:
    """Create version 1 of every role in an empty store; returns the root's bytes.

    Root (consistent snapshots) names the root keys with ``threshold`` and one online key
    per online role, and is signed by every one of ``root_signers``; targets is empty.
    """
    _check_threshold(len(root_signers), threshold)
    for name, value in (
        ("timestamp", timestamp_expiry),
        ("snapshot", snapshot_expiry),
        ("targets", targets_expiry),
        ("root", root_expiry),
    ):
        _check_expiry(name, value)
    now = _now()
    root = Root(version=1, expires=now + root_expiry, consistent_snapshot=True)
    for signer in root_signers:
        root.add_key(signer.public_key, Root.type)
    root.roles[Root.type].threshold = threshold
    for role in ONLINE_ROLES:
        root.add_key(online.for_role(role).public_key, role)
    root_bytes = _sign(root, root_signers)
    _root_signed_enough(root_bytes, None)

    targets = Targets(version=1, expires=now + targets_expiry)
    targets_bytes = _sign(targets, [online.targets])
    snapshot = Snapshot(
        version=1,
        expires=now + snapshot_expiry,
        meta={"targets.json": MetaFile.from_data(1, targets_bytes, ["sha256"])},
    )
    snapshot_bytes = _sign(snapshot, [online.snapshot])
    timestamp = Timestamp(
        version=1,
        expires=now + timestamp_expiry,
        snapshot_meta=MetaFile.from_data(1, snapshot_bytes, ["sha256"]),
    )
    timestamp_bytes = _sign(timestamp, [online.timestamp])

    with store.transaction():
        if store.latest(Root.type) is not None:
            raise ConflictError("the TUF repository exists already")
        store.put_metadata(Root.type, 1, root_bytes, root.expires.timestamp())
        store.put_metadata(Targets.type, 1, targets_bytes, targets.expires.timestamp())
        store.put_metadata(Snapshot.type, 1, snapshot_bytes, snapshot.expires.timestamp())
        store.put_metadata(Timestamp.type, 1, timestamp_bytes, timestamp.expires.timestamp())
    return root_bytes


def rotate_root(
    store: TufStore,
    old_root_signers: Sequence[Signer],
    new_root_signers: Sequence[Signer],
    threshold: int,
    *,
    root_expiry: timedelta = DEFAULT_ROOT_EXPIRY,
) -> bytes:
    """Publish the next root version with new root keys (the online keys stay).

    Signed by every old and new signer given; it must carry a threshold of the old root's
    keys and a threshold of its own, as clients require, or nothing is stored
    (VerificationError). Rotating to the same keys renews the root's expiry.
    """
    _check_threshold(len(new_root_signers), threshold)
    _check_expiry("root", root_expiry)
    with store.transaction():
        latest = store.latest(Root.type)
        if latest is None:
            raise ConfigError("the TUF repository is not initialized")
        previous = _parse(Root, latest[1])
        root = _parse(Root, latest[1])
        for keyid in list(root.roles[Root.type].keyids):
            root.revoke_key(keyid, Root.type)
        for signer in new_root_signers:
            root.add_key(signer.public_key, Root.type)
        root.roles[Root.type].threshold = threshold
        root.version = previous.version + 1
        root.expires = _now() + root_expiry
        unique = {s.public_key.keyid: s for s in [*old_root_signers, *new_root_signers]}
        root_bytes = _sign(root, list(unique.values()))
        _root_signed_enough(root_bytes, previous)
        store.put_metadata(Root.type, root.version, root_bytes, root.expires.timestamp())
    return root_bytes


class TufRepository:
    """The repository a fleet serves: publishes targets, keeps the online roles fresh.

    All state is in the store, so one instance can be shared by every request thread of a
    replica and several replicas can share one database. The online keys must be the ones
    the current root names (checked here, and again before anything is stored).
    """

    def __init__(
        self,
        store: TufStore,
        online: OnlineSigners,
        *,
        timestamp_expiry: timedelta = DEFAULT_TIMESTAMP_EXPIRY,
        snapshot_expiry: timedelta = DEFAULT_SNAPSHOT_EXPIRY,
        targets_expiry: timedelta = DEFAULT_TARGETS_EXPIRY,
    ) -> None:
        self._store = store
        self._online = online
        self._expiry = {
            Timestamp.type: timestamp_expiry,
            Snapshot.type: snapshot_expiry,
            Targets.type: targets_expiry,
        }
        for role, value in self._expiry.items():
            _check_expiry(role, value)
        root = self._root()
        for role in ONLINE_ROLES:
            self._check_online_key(root, role)

    # -- reading

    def _root(self) -> Root:
        latest = self._store.latest(Root.type)
        if latest is None:
            raise ConfigError("the TUF repository is not initialized")
        return _parse(Root, latest[1])

    def _latest(self, role_type: type[_T]) -> tuple[int, _T, bytes]:
        latest = self._store.latest(role_type.type)
        if latest is None:
            raise ConfigError(f"the TUF repository has no {role_type.type} metadata")
        version, data = latest
        return version, _parse(role_type, data), data

    def trusted_root(self) -> bytes:
        """The newest root: what a node is given to trust when it enrolls."""
        latest = self._store.latest(Root.type)
        if latest is None:
            raise ConfigError("the TUF repository is not initialized")
        return latest[1]

    def targets(self) -> dict[str, TargetInfo]:
        """Every published target, by path."""
        _, targets, _ = self._latest(Targets)
        return {path: _target_info(t) for path, t in targets.targets.items()}

    def expires(self, role: str) -> datetime:
        """When the newest version of ``role`` expires (root needs the offline keys to renew)."""
        if role not in _ROLES:
            raise NotFoundError(f"no TUF role {role!r}")
        latest = self._store.latest(role)
        if latest is None:
            raise ConfigError(f"the TUF repository has no {role} metadata")
        signed: Signed = Metadata.from_bytes(latest[1]).signed
        return signed.expires

    def metadata_file(self, name: str) -> bytes:
        """A metadata file by the name a client asks for.

        ``N.ROLE.json`` is version N of ROLE; ``ROLE.json`` (``timestamp.json`` in
        particular) is the newest version. Anything else is a NotFoundError.
        """
        match = _METADATA_NAME.fullmatch(name)
        if match is None:
            raise NotFoundError(f"no TUF metadata file {name!r}")
        version, role = match.group(1), match.group(2)
        if version is None:
            latest = self._store.latest(role)
            data = None if latest is None else latest[1]
        else:
            data = self._store.get(role, int(version))
        if data is None:
            raise NotFoundError(f"no TUF metadata file {name!r}")
        return data

    def target_file(self, name: str) -> bytes:
        """A target's bytes by its consistent-snapshot name ``DIR/SHA256.NAME``.

        Served as stored: the client checks them against the signed targets metadata.
        """
        directory, sep, filename = name.rpartition("/")
        digest, dot, basename = filename.partition(".")
        path = f"{directory}{sep}{basename}"
        if not dot or not _SHA256.fullmatch(digest) or not _TARGET_PATH.fullmatch(path):
            raise NotFoundError(f"no TUF target file {name!r}")
        _, targets, _ = self._latest(Targets)
        target = targets.targets.get(path)
        if target is None or target.hashes.get("sha256") != digest:
            raise NotFoundError(f"no TUF target file {name!r}")
        data = self._store.get_blob(digest)
        if data is None:
            raise NotFoundError(f"the bytes of TUF target {path!r} are missing from the store")
        return data

    # -- writing

    def add_target(self, path: str, data: bytes, custom: Mapping[str, Any]) -> TargetInfo:
        """Publish ``data`` as target ``path``: new targets, snapshot and timestamp versions.

        Publishing the same bytes again changes nothing; other bytes under a published
        path are a ConflictError (a version's bytes never change: publish a new version).
        """
        if not _TARGET_PATH.fullmatch(path):
            raise InvalidRequestError(
                f"TUF target path {path!r} must be segments of letters, digits and ._+- "
                "separated by '/'"
            )
        sha256 = hashlib.sha256(data).hexdigest()
        with self._store.transaction():
            _, targets, _ = self._latest(Targets)
            existing = targets.targets.get(path)
            if existing is not None:
                if existing.hashes.get("sha256") == sha256:
                    return _target_info(existing)
                raise ConflictError(
                    f"TUF target {path} is published already with other bytes; "
                    "publish them as a new version"
                )
            self._store.put_blob(sha256, data)
            target = TargetFile(len(data), {"sha256": sha256}, path, {"custom": dict(custom)})
            targets.targets[path] = target
            self._publish_targets(targets, _now())
        return _target_info(target)

    def refresh_timestamp(self, now: datetime | None = None) -> bool:
        """Re-sign what has passed half its life; True when a new version was published.

        Meant to run periodically on every replica (the store's lock makes one of them do
        the work). Timestamp is the role that needs it daily; snapshot and targets are
        renewed the same way, so a fleet that publishes nothing for weeks stays valid.
        """
        now = _now() if now is None else now
        with self._store.transaction():
            _, targets, _ = self._latest(Targets)
            if self._past_half_life(targets, now):
                self._publish_targets(targets, now)
                return True
            _, snapshot, _ = self._latest(Snapshot)
            if self._past_half_life(snapshot, now):
                self._publish_snapshot(snapshot, now)
                return True
            _, timestamp, _ = self._latest(Timestamp)
            if self._past_half_life(timestamp, now):
                snapshot_version, _, snapshot_bytes = self._latest(Snapshot)
                self._publish_timestamp(timestamp, snapshot_version, snapshot_bytes, now)
                return True
        return False

    def _past_half_life(self, signed: Signed, now: datetime) -> bool:
        return signed.expires - now < self._expiry[signed.type] / 2

    def _publish_targets(self, targets: Targets, now: datetime) -> None:
        targets.version += 1
        targets_bytes = self._put(targets, now)
        _, snapshot, _ = self._latest(Snapshot)
        # Length and hashes, not only the version: a targets file swapped for another is
        # caught even when it claims the expected version.
        snapshot.meta["targets.json"] = MetaFile.from_data(
            targets.version, targets_bytes, ["sha256"]
        )
        self._publish_snapshot(snapshot, now)

    def _publish_snapshot(self, snapshot: Snapshot, now: datetime) -> None:
        snapshot.version += 1
        snapshot_bytes = self._put(snapshot, now)
        _, timestamp, _ = self._latest(Timestamp)
        self._publish_timestamp(timestamp, snapshot.version, snapshot_bytes, now)

    def _publish_timestamp(
        self, timestamp: Timestamp, snapshot_version: int, snapshot_bytes: bytes, now: datetime
    ) -> None:
        timestamp.version += 1
        timestamp.snapshot_meta = MetaFile.from_data(snapshot_version, snapshot_bytes, ["sha256"])
        self._put(timestamp, now)

    def _put(self, signed: _T, now: datetime) -> bytes:
        role = signed.type
        signed.expires = now + self._expiry[role]
        md = Metadata(signed)
        md.sign(self._online.for_role(role))
        # Never store what every client would refuse (say, after a root rotation that
        # replaced an online key this replica still holds).
        try:
            self._root().verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError as exc:
            raise ConfigError(
                f"the online {role} key is not one the current TUF root trusts: {exc}"
            ) from exc
        data = md.to_bytes()
        self._store.put_metadata(role, signed.version, data, signed.expires.timestamp())
        return data

    def _check_online_key(self, root: Root, role: str) -> None:
        keyid = self._online.for_role(role).public_key.keyid
        if keyid not in root.roles[role].keyids:
            raise ConfigError(
                f"the online {role} key ({keyid[:12]}...) is not the one the TUF root names; "
                "are these the keys this repository was created with?"
            )
