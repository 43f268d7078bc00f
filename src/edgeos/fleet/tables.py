"""The fleet database schema, in SQLAlchemy Core.

Times are Unix seconds (float); structured values are JSON text. Alembic migrations
in ``edgeos/fleet/migrations`` create exactly these tables.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

operator_tokens = Table(
    "operator_tokens",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("scopes", String(64), nullable=False),  # comma-separated: read,deploy,admin
    Column("created_at", Float, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("revoked_at", Float, nullable=True),
)

join_tokens = Table(
    "join_tokens",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("group_name", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("uses_left", Integer, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
)

devices = Table(
    "devices",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("group_name", String(128), nullable=False, index=True),
    Column("status", String(16), nullable=False),  # active | revoked
    Column("labels", Text, nullable=False, default="{}"),
    Column("inventory", Text, nullable=False, default="{}"),
    Column("health", Text, nullable=False, default="{}"),
    Column("actual", Text, nullable=False, default="[]"),
    Column("revision", Integer, nullable=False, default=0),  # last revision the node applied
    Column("enrolled_at", Float, nullable=False),
    Column("last_seen", Float, nullable=True),
)

certificates = Table(
    "certificates",
    metadata,
    Column("serial", String(40), primary_key=True),  # hex
    Column("device_id", String(64), nullable=False, index=True),
    Column("not_after", Float, nullable=False),
    Column("issued_at", Float, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)

artifacts = Table(
    "artifacts",
    metadata,
    Column("kind", String(16), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("target", String(400), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("length", Integer, nullable=False),
    Column("published_at", Float, nullable=False),
    Column("published_by", String(128), nullable=False),
)

blobs = Table(
    "blobs",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

tuf_metadata = Table(
    "tuf_metadata",
    metadata,
    Column("role", String(32), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("expires_at", Float, nullable=False),
)

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("selector", Text, nullable=False),
    Column("waves", Text, nullable=False),  # JSON list of cumulative percentages
    Column("soak_s", Float, nullable=False),
    Column("gates", Text, nullable=False),  # JSON list of gate strings
    Column("devices", Text, nullable=False),  # JSON list of device ids in wave order
    Column("status", String(16), nullable=False),  # running|paused|halted|aborted|completed
    Column("current_wave", Integer, nullable=False, default=0),
    Column("wave_started_at", Float, nullable=True),
    Column("reason", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("lease_until", Float, nullable=False, default=0.0),
)

assignments = Table(
    "assignments",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("version", String(64), nullable=False),
    Column("previous_version", String(64), nullable=True),
    Column("rollout_id", String(40), nullable=True),
    Column("assigned_at", Float, nullable=False),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("actor", String(128), nullable=False),  # operator:NAME, device:ID, anonymous
    Column("action", String(64), nullable=False),
    Column("target", String(256), nullable=False),
    Column("outcome", String(16), nullable=False),  # ok | refused
    Column("detail", Text, nullable=True),
)

fleet_state = Table(
    "fleet_state",
    metadata,
    Column("key", String(32), primary_key=True),
    Column("value", Integer, nullable=False),
)
