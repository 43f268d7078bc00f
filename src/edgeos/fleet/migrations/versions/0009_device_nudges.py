"""Nudges: news for one device wakes its long poll alone, not every device's.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``devices.nudges`` and ``nudged_seq`` and the fleet's nudge count."""
    op.add_column("devices", sa.Column("nudges", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("devices", sa.Column("nudged_seq", sa.BigInteger, nullable=True))
    op.create_index("ix_devices_nudged_seq", "devices", ["nudged_seq"])
    state = sa.table("fleet_state", sa.column("key", sa.String), sa.column("value", sa.Integer))
    op.bulk_insert(state, [{"key": "nudges", "value": 0}])


def downgrade() -> None:
    """Drop them: devices' revisions fall back to the fleet's, which they take as news."""
    op.execute("DELETE FROM fleet_state WHERE key = 'nudges'")
    op.drop_index("ix_devices_nudged_seq", table_name="devices")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("nudged_seq")
        batch.drop_column("nudges")
