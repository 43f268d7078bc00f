"""The fleet's TUF repository: the signed metadata it serves, and how it is signed and
published.

The layout is the one in docs/fleet.md ("Artifacts and TUF"): consistent snapshots, so
metadata is served as ``N.root.json``, ``N.targets.json``, ``N.snapshot.json`` and
``timestamp.json``, and a target ``DIR/NAME`` as ``DIR/SHA256.NAME``. Every version of
every role and the bytes of every target live in a
:class:`~edgeos.fleet.tuf_store.TufStore` (the fleet database in production), so replicas
sharing the database serve one repository and publish without overwriting each other.

Root is signed by offline root keys (a threshold of them); targets, snapshot and
timestamp by one online key each, kept with the server (:mod:`edgeos.fleet.tuf_keys`).
Signed versions are never rewritten: every change, re-signing included, is a new version.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from securesystemslib.signer import Signer
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
from edgeos.fleet.tuf_keys import ONLINE_ROLES, OnlineSigners, check_threshold
from edgeos.fleet.tuf_store import TufStore

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
    check_threshold(len(root_signers), threshold)
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
    check_threshold(len(new_root_signers), threshold)
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
