"""When each device made its newest accepted telemetry batch: a device whose sequence
started again (its database restored or reset) is told apart from a replay.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``telemetry_devices.last_sent_at`` (empty until the device's next batch) and
    ``restarted_at`` (empty until its sequence starts again)."""
    op.add_column("telemetry_devices", sa.Column("last_sent_at", sa.Float, nullable=True))
    op.add_column("telemetry_devices", sa.Column("restarted_at", sa.Float, nullable=True))


def downgrade() -> None:
    """Drop ``telemetry_devices.last_sent_at`` and ``restarted_at``."""
    with op.batch_alter_table("telemetry_devices") as batch:
        batch.drop_column("restarted_at")
        batch.drop_column("last_sent_at")
