"""Long-term memory replicated from devices, and devices enrolled as another's replacement.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Backups (position and live records per device), replacements, replacing join tokens."""
    op.create_table(
        "memory_backups",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("records", sa.Integer, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("changes", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "memory_backup_records",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("record", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_table(
        "device_replacements",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("replaces", sa.String(64), nullable=False, index=True),
        sa.Column("join_token_id", sa.String(40), nullable=False),
        sa.Column("replaced_at", sa.Float, nullable=False),
    )
    op.add_column("join_tokens", sa.Column("replaces", sa.String(64), nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("join_tokens") as batch:
        batch.drop_column("replaces")
    for name in ("device_replacements", "memory_backup_records", "memory_backups"):
        op.drop_table(name)
