"""The node's fleet identity, in ``DATA_DIR/fleet/``.

::

    fleet/device.key      the device's EC P-256 key (0600), made once, kept across re-enrollments
    fleet/device-id       the device id (a UUIDv7), chosen with the key, before the first request
    fleet/device.crt      the device certificate the fleet CA issued (renewed during sync)
    fleet/ca.crt          the fleet CA, checked against the join token's pin
    fleet/fleet.json      {url, device_id, group, enrolled_at, certificate_not_before/after}
    fleet/tuf/metadata/   trusted TUF metadata (the root from enrollment, then the chain)
    fleet/tuf/targets/    verified downloads, removed after each apply pass
    fleet/staging/        artifacts unpacked beside the running version
    fleet/policies/       the policies in force (NAME.yaml), see :mod:`edgeos.sync.policy`

``fleet.json`` is written last at enrollment: its presence means enrolled. Every file is
written atomically (a temporary file renamed over the target). Only the standard library
and orjson at import: ``edgeos node status`` reads identities too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edgeos.errors import ConfigError

#: Written by ``edgeos node install --fleet URL --join-token T`` (``edgeos.node.service``):
#: a join request the node takes up at start, then deletes once it has enrolled.
JOIN_FILE = "fleet-join.json"

#: Renew once this share of the certificate's validity is left.
RENEW_WHEN_LEFT = 1 / 3


@dataclass(frozen=True)
class FleetPaths:
    """Where the fleet identity and its working files live."""

    root: Path

    @classmethod
    def of(cls, data_dir: Path) -> FleetPaths:
        """The layout under a node's data directory."""
        return cls(Path(data_dir) / "fleet")

    @property
    def key(self) -> Path:
        """The device's private key."""
        return self.root / "device.key"

    @property
    def device_id(self) -> Path:
        """The device id chosen with the key."""
        return self.root / "device-id"

    @property
    def cert(self) -> Path:
        """The device certificate."""
        return self.root / "device.crt"

    @property
    def ca(self) -> Path:
        """The fleet CA certificate."""
        return self.root / "ca.crt"

    @property
    def identity(self) -> Path:
        """``fleet.json``."""
        return self.root / "fleet.json"

    @property
    def revoked(self) -> Path:
        """The fleet's revocations as last fetched (``Revocations`` JSON)."""
        return self.root / "revoked.json"

    @property
    def tuf_metadata(self) -> Path:
        """Trusted TUF metadata."""
        return self.root / "tuf" / "metadata"

    @property
    def tuf_targets(self) -> Path:
        """Verified TUF downloads."""
        return self.root / "tuf" / "targets"

    @property
    def staging(self) -> Path:
        """Where artifacts are unpacked before a switch."""
        return self.root / "staging"

    @property
    def policies(self) -> Path:
        """The policies in force."""
        return self.root / "policies"


@dataclass(frozen=True)
class Identity:
    """An enrolled node: which fleet, which device, which group, until when certified."""

    url: str
    device_id: str
    group: str
    enrolled_at: float
    certificate_not_before: float
    certificate_not_after: float

    def renewal_due(self, now: float) -> bool:
        """Whether to ask for a new certificate: a third (or less) of its validity is left."""
        return renewal_due(self.certificate_not_before, self.certificate_not_after, now)

    def expired(self, now: float) -> bool:
        """Whether the certificate has run out (the fleet will refuse it)."""
        return now >= self.certificate_not_after

    def to_json(self) -> dict[str, Any]:
        """``fleet.json``'s content."""
        return {
            "url": self.url, "device_id": self.device_id, "group": self.group,
            "enrolled_at": self.enrolled_at,
            "certificate_not_before": self.certificate_not_before,
            "certificate_not_after": self.certificate_not_after,
        }  # fmt: skip


def renewal_due(not_before: float, not_after: float, now: float) -> bool:
    """True once at most :data:`RENEW_WHEN_LEFT` of the validity ``[not_before, not_after)``
    is left."""
    return now >= not_after - (not_after - not_before) * RENEW_WHEN_LEFT


def load_identity(data_dir: Path) -> Identity | None:
    """The node's identity, or None when it has not enrolled.

    ConfigError names ``fleet.json`` when it exists but cannot be read.
    """
    path = FleetPaths.of(data_dir).identity
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); enroll again with a join token") from exc
    try:
        return Identity(
            url=str(doc["url"]),
            device_id=str(doc["device_id"]),
            group=str(doc["group"]),
            enrolled_at=float(doc["enrolled_at"]),
            certificate_not_before=float(doc["certificate_not_before"]),
            certificate_not_after=float(doc["certificate_not_after"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: field {exc} is missing or wrong") from exc


def save_identity(data_dir: Path, identity: Identity) -> None:
    """Write ``fleet.json`` atomically."""
    data = orjson.dumps(identity.to_json(), option=orjson.OPT_INDENT_2)
    # Here: reading an identity (node status) must not import the cryptography stack.
    from edgeos.files import write_atomic

    write_atomic(FleetPaths.of(data_dir).identity, data, 0o600)


def read_join_request(data_dir: Path) -> tuple[str | None, str | None]:
    """``(url, join_token)`` stored by ``edgeos node install``, or ``(None, None)``."""
    path = Path(data_dir) / JOIN_FILE
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None, None
    if not isinstance(doc, dict):
        return None, None
    url, token = doc.get("url"), doc.get("join_token")
    return (url if isinstance(url, str) else None, token if isinstance(token, str) else None)


def forget_join_request(data_dir: Path) -> None:
    """Delete the stored join request: its token is spent once the node has enrolled."""
    with contextlib.suppress(FileNotFoundError):
        (Path(data_dir) / JOIN_FILE).unlink()
