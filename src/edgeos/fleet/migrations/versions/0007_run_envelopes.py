"""Run envelopes relayed from one device to another (runs moved between nodes).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``run_envelopes``."""
    op.create_table(
        "run_envelopes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False, index=True),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    """Drop ``run_envelopes`` (envelopes not fetched yet are lost; their runs can be
    taken back on their sources once the envelopes expire)."""
    op.drop_table("run_envelopes")
