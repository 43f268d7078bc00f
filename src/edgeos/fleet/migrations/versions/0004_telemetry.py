"""Telemetry received from devices: KPIs in one-minute buckets, events, batch sequences.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create the telemetry tables."""
    op.create_table(
        "telemetry_kpis",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("minute", sa.BigInteger, primary_key=True),
        sa.Column("agent", sa.String(128), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("runs", sa.Integer, nullable=False),
        sa.Column("succeeded", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("answered", sa.Integer, nullable=False),
        sa.Column("overrides", sa.Integer, nullable=False),
        sa.Column("errors", sa.Integer, nullable=False),
        sa.Column("cost", sa.Float, nullable=False),
        sa.Column("recoveries", sa.Integer, nullable=False),
        sa.Column("recovery_s", sa.Float, nullable=False),
        sa.Column("drift", sa.Float, nullable=True),
        sa.Column("decision", sa.LargeBinary, nullable=True),
        sa.Column("inference", sa.LargeBinary, nullable=True),
    )
    op.create_index("ix_telemetry_kpis_minute", "telemetry_kpis", ["minute"])
    op.create_table(
        "telemetry_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_index("ix_telemetry_events_device_id", "telemetry_events", ["device_id"])
    op.create_index("ix_telemetry_events_at", "telemetry_events", ["at"])
    op.create_table(
        "telemetry_devices",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("batches", sa.BigInteger, nullable=False),
        sa.Column("records", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("dropped", sa.Text, nullable=False),
        sa.Column("last_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    """Drop the telemetry tables."""
    op.drop_table("telemetry_devices")
    op.drop_index("ix_telemetry_events_at", "telemetry_events")
    op.drop_index("ix_telemetry_events_device_id", "telemetry_events")
    op.drop_table("telemetry_events")
    op.drop_index("ix_telemetry_kpis_minute", "telemetry_kpis")
    op.drop_table("telemetry_kpis")
