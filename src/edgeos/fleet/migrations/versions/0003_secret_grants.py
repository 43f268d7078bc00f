"""Secret grants: values sealed at rest, each for one device or a group, scoped, expiring.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``secret_grants``."""
    op.create_table(
        "secret_grants",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=True, index=True),
        sa.Column("group_name", sa.String(128), nullable=True, index=True),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("nonce", sa.LargeBinary, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("revoked_by", sa.String(128), nullable=True),
    )


def downgrade() -> None:
    """Drop ``secret_grants`` (and every grant in it)."""
    op.drop_table("secret_grants")
