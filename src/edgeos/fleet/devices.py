"""The device registry: list, show, label and revoke enrolled devices.

Every function works inside the caller's transaction and raises before changing
anything when its input is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from edgeos.errors import ConfigError, NotFoundError
from edgeos.fleet import tables
from edgeos.fleet.db import bump_revision
from edgeos.protocol.migration import Revocations

# What a label key or value may hold: the characters a rollout selector can name
# (``label:K=V``), so every label can be targeted.
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
MAX_LABELS = 64


def labels_of(text: str | None) -> dict[str, str]:
    """A device's labels from their stored JSON."""
    value = orjson.loads(text or "{}")
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def check_labels(labels: Mapping[str, Any]) -> dict[str, str]:
    """``labels`` if every key and value is a valid label word, else ConfigError naming it."""
    problems = [
        f"label {key!r}={value!r}"
        for key, value in labels.items()
        if not isinstance(key, str) or not isinstance(value, str)
        or not LABEL.match(key) or not LABEL.match(value)
    ]  # fmt: skip
    if problems:
        raise ConfigError(
            f"{', '.join(problems)}: keys and values are 1-128 of A-Z a-z 0-9 . _ : / @ + - "
            "starting with a letter or digit"
        )
    if len(labels) > MAX_LABELS:
        raise ConfigError(f"{len(labels)} labels: a device has at most {MAX_LABELS}")
    return dict(labels)


def parse_label_terms(terms: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` as a mapping; ConfigError naming a term without ``=``."""
    labels: dict[str, str] = {}
    for term in terms:
        key, eq, value = term.partition("=")
        if not eq:
            raise ConfigError(f"label {term!r}: write KEY=VALUE")
        labels[key] = value
    return check_labels(labels)


def _summary(row: RowMapping) -> dict[str, Any]:
    return {
        "id": row["id"],
        "group": row["group_name"],
        "status": row["status"],
        "labels": labels_of(row["labels"]),
        "revision": row["revision"],
        "enrolled_at": row["enrolled_at"],
        "last_seen": row["last_seen"],
        "health": orjson.loads(row["health"] or "{}"),
        "inventory": orjson.loads(row["inventory"] or "{}"),
        "actual": orjson.loads(row["actual"] or "[]"),
    }


def list_devices(
    conn: Connection,
    *,
    group: str | None = None,
    labels: Mapping[str, str] | None = None,
    status: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Devices in id order, filtered by group, labels (all must match) and status."""
    d = tables.devices
    query = sa.select(d).order_by(d.c.id)
    if group is not None:
        query = query.where(d.c.group_name == group)
    if status is not None:
        query = query.where(d.c.status == status)
    wanted = dict(labels or {})
    found: list[dict[str, Any]] = []
    for row in conn.execute(query).mappings():
        # Labels are JSON text: matched here rather than in SQL, so it works on both databases.
        if wanted:
            have = labels_of(row["labels"])
            if any(have.get(k) != v for k, v in wanted.items()):
                continue
        found.append(_summary(row))
        if len(found) >= limit:
            break
    return found


def show_device(conn: Connection, device_id: str) -> dict[str, Any]:
    """One device with its assignments and certificates; NotFoundError if unknown."""
    d, a, c = tables.devices, tables.assignments, tables.certificates
    row = conn.execute(sa.select(d).where(d.c.id == device_id)).mappings().first()
    if row is None:
        raise NotFoundError(f"no device {device_id!r}")
    shown = _summary(row)
    shown["assignments"] = [
        dict(r)
        for r in conn.execute(
            sa.select(a.c.kind, a.c.name, a.c.version, a.c.previous_version, a.c.rollout_id,
                      a.c.assigned_at)
            .where(a.c.device_id == device_id).order_by(a.c.kind, a.c.name)
        ).mappings()
    ]  # fmt: skip
    shown["certificates"] = [
        dict(r)
        for r in conn.execute(
            sa.select(c.c.serial, c.c.issued_at, c.c.not_after, c.c.revoked)
            .where(c.c.device_id == device_id).order_by(c.c.issued_at)
        ).mappings()
    ]  # fmt: skip
    return shown


def set_labels(conn: Connection, device_id: str, labels: Mapping[str, Any]) -> dict[str, str]:
    """Replace a device's labels; returns them. NotFoundError if the device is unknown."""
    checked = check_labels(labels)
    d = tables.devices
    done = conn.execute(
        sa.update(d)
        .where(d.c.id == device_id)
        .values(labels=orjson.dumps(checked, option=orjson.OPT_SORT_KEYS).decode())
    )
    if done.rowcount == 0:
        raise NotFoundError(f"no device {device_id!r}")
    return checked


def revoke_device(conn: Connection, device_id: str) -> bool:
    """Revoke a device and every certificate it holds; False if it was revoked already.

    It is refused from its next request on; only a new join token brings it back.
    """
    d, c = tables.devices, tables.certificates
    status = conn.execute(sa.select(d.c.status).where(d.c.id == device_id)).scalar()
    if status is None:
        raise NotFoundError(f"no device {device_id!r}")
    conn.execute(sa.update(d).where(d.c.id == device_id).values(status="revoked"))
    conn.execute(sa.update(c).where(c.c.device_id == device_id).values(revoked=True))
    bump_revision(conn)  # every device fetches the revocations and refuses its runs
    return bool(status != "revoked")


def revocations(conn: Connection, *, now: float) -> Revocations:
    """The revoked device certificates still within their validity, and their devices
    (an expired one is refused by its dates anyway)."""
    c = tables.certificates
    rows = conn.execute(
        sa.select(c.c.serial, c.c.device_id)
        .where(c.c.revoked.is_(True), c.c.not_after > now)
        .order_by(c.c.serial)
    ).all()
    return Revocations(
        serials=[r.serial for r in rows], devices=sorted({r.device_id for r in rows})
    )
