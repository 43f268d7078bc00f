"""The fleet database schema, in SQLAlchemy Core.

Times are Unix seconds (float); structured values are JSON text. Alembic migrations
in ``edgeos/fleet/migrations`` create exactly these tables.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
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
    # The device the enrolled one replaces: it is revoked, and its memory restored.
    Column("replaces", String(64), nullable=True),
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
    # News for this device alone (an answer, a run handed to it): its revision is the
    # fleet's plus this, so only its long poll wakes (edgeos.fleet.db.nudge_device).
    Column("nudges", BigInteger, nullable=False, default=0, server_default="0"),
    Column("nudged_seq", BigInteger, nullable=True, index=True),  # the fleet's nudge count then
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

secret_grants = Table(
    "secret_grants",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(64), nullable=False, index=True),
    Column("version", Integer, nullable=False),  # per name: a new grant of it is one more
    Column("device_id", String(64), nullable=True, index=True),  # one device, or
    Column("group_name", String(128), nullable=True, index=True),  # every device of a group
    Column("scopes", Text, nullable=False),  # JSON list
    Column("expires_at", Float, nullable=False),
    Column("nonce", LargeBinary, nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),  # under keys/secrets.key; emptied on revoke
    Column("created_at", Float, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("revoked_at", Float, nullable=True),
    Column("revoked_by", String(128), nullable=True),
)

fleet_state = Table(
    "fleet_state",
    metadata,
    Column("key", String(32), primary_key=True),
    Column("value", Integer, nullable=False),
)

escalations = Table(
    "escalations",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("id", String(200), primary_key=True),  # the node's escalation id
    Column("agent", String(128), nullable=False),
    Column("run_id", String(128), nullable=False),
    Column("step", String(128), nullable=False),
    Column("question", Text, nullable=False),
    Column("options", Text, nullable=False),  # JSON list
    Column("proposal", Text, nullable=False),  # JSON
    Column("default_choice", Text, nullable=False),  # JSON
    Column("deadline", Float, nullable=False),
    Column("reported_at", Float, nullable=False),
    # open | answered (waiting for the device) | applied | refused | closed (on the device)
    Column("state", String(16), nullable=False, index=True),
    Column("answer", Text, nullable=True),  # JSON
    Column("note", Text, nullable=True),
    Column("answered_by", String(128), nullable=True),
    Column("answered_at", Float, nullable=True),
    Column("detail", Text, nullable=True),  # the device's word on the answer, or why it closed
    Column("updated_at", Float, nullable=False),
)

memory_backups = Table(
    "memory_backups",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),  # last sequence of the device's log applied
    Column("records", Integer, nullable=False),  # live records held
    Column("bytes", BigInteger, nullable=False),  # their JSON bodies' size
    Column("changes", BigInteger, nullable=False),  # changes ever applied
    Column("updated_at", Float, nullable=False),
)

memory_backup_records = Table(
    "memory_backup_records",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("record", String(128), primary_key=True),
    Column("seq", BigInteger, nullable=False),  # the put that wrote it
    Column("size", Integer, nullable=False),
    Column("body", Text, nullable=False),  # JSON: edgeos.protocol.fleet.MemoryRecordBody
)

device_replacements = Table(
    "device_replacements",
    metadata,
    Column("device_id", String(64), primary_key=True),  # the replacement
    Column("replaces", String(64), nullable=False, index=True),
    Column("join_token_id", String(40), nullable=False),
    Column("replaced_at", Float, nullable=False),
)

# Telemetry (edgeos.fleet.telemetry_store): KPIs in one-minute buckets per device, agent
# and model version; alerts, traces and logs as events; each device's batch sequence.
telemetry_kpis = Table(
    "telemetry_kpis",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("minute", BigInteger, primary_key=True, index=True),  # Unix s, start of the minute
    Column("agent", String(128), primary_key=True),  # "" on a model version's row
    Column("model", String(128), primary_key=True),  # "" on an agent's row
    Column("version", String(64), primary_key=True),
    Column("runs", Integer, nullable=False),
    Column("succeeded", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("answered", Integer, nullable=False),
    Column("overrides", Integer, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("cost", Float, nullable=False),
    Column("recoveries", Integer, nullable=False),
    Column("recovery_s", Float, nullable=False),
    Column("drift", Float, nullable=True),
    Column("decision", LargeBinary, nullable=True),  # DDSketch of decision latency (s)
    Column("inference", LargeBinary, nullable=True),  # DDSketch of inference latency (s)
)

# The latency sketches of every device's KPIs, merged per minute as they arrive: what a
# fleet-wide chart reads, one row a minute per agent or model version, instead of
# merging one sketch per device and minute at every page view.
telemetry_sketches = Table(
    "telemetry_sketches",
    metadata,
    Column("minute", BigInteger, primary_key=True),
    Column("agent", String(128), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("decision", LargeBinary, nullable=True),
    Column("inference", LargeBinary, nullable=True),
)

telemetry_events = Table(
    "telemetry_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # alert | trace | log
    Column("at", Float, nullable=False, index=True),
    Column("data", Text, nullable=False),  # JSON, redacted on the device
)

telemetry_devices = Table(
    "telemetry_devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("last_seq", BigInteger, nullable=False),  # a batch must come with a higher one
    Column("batches", BigInteger, nullable=False),
    Column("records", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),  # compressed, as received
    Column("dropped", Text, nullable=False),  # JSON: records the device dropped, per kind
    Column("last_at", Float, nullable=False),
    # When the device made the newest batch accepted (its clock): a batch made later is
    # new even under a lower sequence, since the device's sequence started again.
    Column("last_sent_at", Float),
    # When the device made the batch that started its sequence again: batches made before
    # it are replays, whatever their sequence.
    Column("restarted_at", Float),
)

# Alerts (edgeos.fleet.alerts): operators' rules, what fires now, notifications to send.
alert_rules = Table(
    "alert_rules",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("metric", String(32), nullable=False),  # p99_ms | success_rate | offline_s | drift
    Column("op", String(2), nullable=False),  # > or <
    Column("bound", Float, nullable=False),
    Column("per", String(16), nullable=False),  # device | agent | model
    Column("window_s", Float, nullable=False),  # KPI rules: the recent past they judge
    Column("target", Text, nullable=False),  # a device selector
    Column("webhook", Text, nullable=False),
    Column("secret", Text, nullable=True),  # signs each notification (HMAC-SHA256)
    Column("created_by", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
)

alert_states = Table(
    "alert_states",
    metadata,
    Column("rule_id", String(40), primary_key=True),  # a row per firing (rule, subject)
    Column("subject", String(200), primary_key=True),
    Column("value", Float, nullable=False),
    Column("since", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

alert_notifications = Table(
    "alert_notifications",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rule_id", String(40), nullable=False, index=True),
    Column("subject", String(200), nullable=False),
    Column("status", String(16), nullable=False),  # firing | resolved
    Column("body", Text, nullable=False),  # JSON, as sent
    Column("state", String(16), nullable=False, index=True),  # pending | delivered | dead
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("leased_until", Float, nullable=False),  # a replica sending it holds it until then
    Column("created_at", Float, nullable=False),
    Column("delivered_at", Float, nullable=True),
    Column("error", Text, nullable=True),
)

run_envelopes = Table(
    "run_envelopes",
    metadata,
    Column("id", String(64), primary_key=True),  # the envelope id its source signed
    Column("source", String(64), nullable=False),
    Column("destination", String(64), nullable=False, index=True),
    Column("run_id", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("body", LargeBinary, nullable=False),  # the envelope as its source sent it
)
