"""Latency sketches merged fleet-wide per minute as telemetry arrives, for fleet charts.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections import defaultdict

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None

_KEY = ("minute", "agent", "model", "version")


def upgrade() -> None:
    """Create ``telemetry_sketches`` and fill it from the KPIs already stored."""
    from edgeos.fleet.telemetry_store import SketchSum

    sketches = op.create_table(
        "telemetry_sketches",
        sa.Column("minute", sa.BigInteger, primary_key=True),
        sa.Column("agent", sa.String(128), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("decision", sa.LargeBinary, nullable=True),
        sa.Column("inference", sa.LargeBinary, nullable=True),
    )
    kpis = sa.table(
        "telemetry_kpis", *(sa.column(name) for name in (*_KEY, "decision", "inference"))
    )
    sums: dict[tuple[object, ...], dict[str, SketchSum]] = defaultdict(
        lambda: {"decision": SketchSum(), "inference": SketchSum()}
    )
    seen: dict[tuple[object, ...], set[str]] = defaultdict(set)
    rows = op.get_bind().execute(
        sa.select(kpis).where(sa.or_(kpis.c.decision.is_not(None), kpis.c.inference.is_not(None)))
    )
    for row in rows.mappings():
        key = tuple(row[name] for name in _KEY)
        for name in ("decision", "inference"):
            if row[name] is not None:
                sums[key][name].add(row[name])
                seen[key].add(name)
    op.bulk_insert(sketches, [
        {**dict(zip(_KEY, key, strict=True)),
         **{name: parts[name].sketch().to_bytes() if name in seen[key] else None
            for name in ("decision", "inference")}}
        for key, parts in sums.items()
    ])  # fmt: skip


def downgrade() -> None:
    """Drop ``telemetry_sketches``: charts merge every device's sketches again."""
    op.drop_table("telemetry_sketches")
