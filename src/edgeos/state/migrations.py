"""Named migrations of the node database, applied in order and recorded as they run.

A migration is never edited once released: a change of schema is a new migration at the
end of the list. The names recorded in a database tell which edgeos wrote it, so a file
from a newer edgeos (with names this one does not know) is refused rather than opened.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One schema step: a unique name and the SQL script that applies it."""

    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_model_registry",
        """
        CREATE TABLE model_versions (
            name        TEXT NOT NULL,
            version     TEXT NOT NULL,
            sha256      TEXT NOT NULL,
            manifest    TEXT NOT NULL,
            created_at  REAL NOT NULL,
            is_default  INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (name, version)
        );
        CREATE UNIQUE INDEX model_versions_one_default
            ON model_versions (name) WHERE is_default = 1;
        CREATE INDEX model_versions_sha256 ON model_versions (sha256);
        CREATE TABLE model_profiles (
            name        TEXT NOT NULL,
            version     TEXT NOT NULL,
            created_at  REAL NOT NULL,
            profile     TEXT NOT NULL,
            PRIMARY KEY (name, version),
            FOREIGN KEY (name, version) REFERENCES model_versions (name, version)
                ON DELETE CASCADE
        );
        """,
    ),
    Migration(
        "0002_agents",
        """
        CREATE TABLE agents (
            name        TEXT PRIMARY KEY,
            version     TEXT NOT NULL,
            manifest    TEXT NOT NULL,
            bundle_dir  TEXT NOT NULL,
            paused      INTEGER NOT NULL DEFAULT 0,
            installed_at REAL NOT NULL
        );
        CREATE TABLE runs (
            id          TEXT PRIMARY KEY,
            agent       TEXT NOT NULL,
            agent_version TEXT NOT NULL,
            trigger     TEXT NOT NULL,
            input       TEXT NOT NULL,
            state       TEXT NOT NULL,
            next_step   TEXT,
            step_count  INTEGER NOT NULL DEFAULT 0,
            carry       TEXT,
            seed        INTEGER NOT NULL,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL,
            finished_at REAL,
            outcome     TEXT,
            error       TEXT,
            cost        REAL NOT NULL DEFAULT 0
        );
        CREATE INDEX runs_active ON runs (state)
            WHERE state IN ('pending', 'running', 'waiting_human', 'paused');
        CREATE INDEX runs_by_agent ON runs (agent, id);
        CREATE TABLE journal (
            seq         INTEGER PRIMARY KEY,
            run_id      TEXT NOT NULL,
            kind        TEXT NOT NULL,
            step        TEXT,
            at          REAL NOT NULL,
            payload     TEXT NOT NULL,
            prev_hash   TEXT NOT NULL,
            hash        TEXT NOT NULL
        );
        CREATE INDEX journal_by_run ON journal (run_id, seq);
        CREATE TABLE outbox (
            key         TEXT PRIMARY KEY,
            run_id      TEXT NOT NULL,
            connector   TEXT NOT NULL,
            operation   TEXT NOT NULL,
            payload     TEXT NOT NULL,
            state       TEXT NOT NULL DEFAULT 'pending',
            attempts    INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_error  TEXT,
            result      TEXT,
            created_at  REAL NOT NULL,
            delivered_at REAL
        );
        CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';
        CREATE TABLE escalations (
            id          TEXT PRIMARY KEY,
            run_id      TEXT NOT NULL,
            step        TEXT NOT NULL,
            question    TEXT NOT NULL,
            options     TEXT NOT NULL,
            proposal    TEXT,
            default_choice TEXT NOT NULL,
            deadline    REAL NOT NULL,
            state       TEXT NOT NULL DEFAULT 'open',
            answer      TEXT,
            note        TEXT,
            answered_by TEXT,
            answered_at REAL,
            override    INTEGER
        );
        CREATE INDEX escalations_open ON escalations (deadline) WHERE state = 'open';
        CREATE TABLE feedback (
            id          INTEGER PRIMARY KEY,
            agent       TEXT NOT NULL,
            run_id      TEXT NOT NULL,
            at          REAL NOT NULL,
            decision    TEXT NOT NULL,
            outcome     TEXT,
            correction  TEXT
        );
        CREATE INDEX feedback_by_agent ON feedback (agent, id);
        """,
    ),
    Migration(
        "0003_learning",
        """
        CREATE TABLE observations (
            id          INTEGER PRIMARY KEY,
            agent       TEXT NOT NULL,
            model       TEXT NOT NULL,
            run_id      TEXT NOT NULL,
            at          REAL NOT NULL,
            confidence  REAL,
            inputs      BLOB NOT NULL
        );
        CREATE INDEX observations_by_model ON observations (agent, model, id);
        """,
    ),
    Migration(
        "0004_escalations_by_run",
        """
        CREATE INDEX escalations_by_run ON escalations (run_id);
        """,
    ),
    Migration(
        "0005_journal_anchor",
        """
        CREATE TABLE journal_anchor (
            id          INTEGER PRIMARY KEY CHECK (id = 1),
            seq         INTEGER NOT NULL,
            hash        TEXT NOT NULL,
            compacted_at REAL NOT NULL,
            removed     INTEGER NOT NULL
        );
        """,
    ),
    Migration(
        "0006_secrets",
        """
        CREATE TABLE secrets (
            name        TEXT PRIMARY KEY,
            version     INTEGER NOT NULL,
            nonce       BLOB NOT NULL,
            ciphertext  BLOB NOT NULL,
            scopes      TEXT NOT NULL,
            expires_at  REAL,
            updated_at  REAL NOT NULL
        );
        """,
    ),
    Migration(
        "0007_fleet_artifacts",
        """
        -- What the fleet deployed here, one row per artifact: the version last switched to
        -- and its state (switching, active, failed), the version to go back to, and why.
        CREATE TABLE fleet_artifacts (
            kind        TEXT NOT NULL,
            name        TEXT NOT NULL,
            version     TEXT NOT NULL,
            state       TEXT NOT NULL,
            previous_version TEXT,
            previous_ref TEXT,
            reason      TEXT,
            assigned    INTEGER NOT NULL DEFAULT 1,
            updated_at  REAL NOT NULL,
            PRIMARY KEY (kind, name)
        );
        -- Small facts of the fleet link: health_since, revision, link (JSON).
        CREATE TABLE fleet_state (
            key         TEXT PRIMARY KEY,
            value       TEXT NOT NULL
        );
        """,
    ),
    Migration(
        "0008_memory",
        """
        -- Long-term memory of agents (edgeos.memory). A record's vector and the filter rows
        -- derived from it hang off its rowid and go when it goes (ON DELETE CASCADE).
        CREATE TABLE memory_records (
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            id          TEXT NOT NULL UNIQUE,
            agent       TEXT NOT NULL,
            subject     TEXT,
            text        TEXT NOT NULL,
            metadata    TEXT NOT NULL,
            importance  REAL NOT NULL,
            model       TEXT NOT NULL,
            created_at  REAL NOT NULL,
            expires_at  REAL,
            last_used_at REAL NOT NULL,
            uses        INTEGER NOT NULL DEFAULT 0,
            bytes       INTEGER NOT NULL,
            run_id      TEXT
        );
        CREATE INDEX memory_by_agent ON memory_records (agent, model);
        CREATE INDEX memory_by_subject ON memory_records (agent, subject)
            WHERE subject IS NOT NULL;
        CREATE INDEX memory_expiring ON memory_records (agent, expires_at)
            WHERE expires_at IS NOT NULL;
        CREATE INDEX memory_by_importance ON memory_records (agent, importance, last_used_at);
        CREATE INDEX memory_by_use ON memory_records (agent, last_used_at);
        -- float32, unit length, as many as the embedding model's dimensions.
        CREATE TABLE memory_vectors (
            seq         INTEGER PRIMARY KEY REFERENCES memory_records (seq) ON DELETE CASCADE,
            vector      BLOB NOT NULL
        );
        -- The metadata fields an agent's manifest lists as filterable, one row per value.
        CREATE TABLE memory_fields (
            agent       TEXT NOT NULL,
            name        TEXT NOT NULL,
            value       TEXT NOT NULL,
            seq         INTEGER NOT NULL REFERENCES memory_records (seq) ON DELETE CASCADE,
            PRIMARY KEY (agent, name, value, seq)
        ) WITHOUT ROWID;
        CREATE INDEX memory_fields_by_record ON memory_fields (seq);
        -- What each agent holds, kept by the triggers below (the caps read it per commit).
        CREATE TABLE memory_usage (
            agent       TEXT PRIMARY KEY,
            records     INTEGER NOT NULL,
            bytes       INTEGER NOT NULL
        );
        -- The change log replication ships and in-process indexes follow. It names records,
        -- never holds their content: an erasure leaves nothing of them here.
        CREATE TABLE memory_changes (
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            agent       TEXT NOT NULL,
            op          TEXT NOT NULL,
            record      TEXT NOT NULL,
            record_seq  INTEGER NOT NULL,
            at          REAL NOT NULL
        );
        CREATE INDEX memory_changes_by_agent ON memory_changes (agent, seq);
        CREATE TRIGGER memory_record_added AFTER INSERT ON memory_records BEGIN
            INSERT INTO memory_usage (agent, records, bytes) VALUES (new.agent, 1, new.bytes)
                ON CONFLICT (agent) DO UPDATE SET records = records + 1,
                bytes = bytes + excluded.bytes;
            INSERT INTO memory_changes (agent, op, record, record_seq, at)
                VALUES (new.agent, 'put', new.id, new.seq, new.created_at);
        END;
        CREATE TRIGGER memory_record_removed AFTER DELETE ON memory_records BEGIN
            UPDATE memory_usage SET records = records - 1, bytes = bytes - old.bytes
                WHERE agent = old.agent;
            INSERT INTO memory_changes (agent, op, record, record_seq, at)
                VALUES (old.agent, 'delete', old.id, old.seq,
                        (julianday('now') - 2440587.5) * 86400.0);
        END;
        -- How far each replication target has durably applied the change log.
        CREATE TABLE memory_replicas (
            target      TEXT PRIMARY KEY,
            position    INTEGER NOT NULL,
            updated_at  REAL NOT NULL
        );
        -- Short-term context of unfinished runs (ctx.context): purged when a run finishes.
        CREATE TABLE run_context (
            run_id      TEXT NOT NULL,
            key         TEXT NOT NULL,
            value       TEXT NOT NULL,
            PRIMARY KEY (run_id, key)
        ) WITHOUT ROWID;
        CREATE TABLE run_turns (
            run_id      TEXT NOT NULL,
            n           INTEGER NOT NULL,
            role        TEXT NOT NULL,
            text        TEXT NOT NULL,
            at          REAL NOT NULL,
            PRIMARY KEY (run_id, n)
        ) WITHOUT ROWID;
        """,
    ),
    Migration(
        "0009_secret_grants",
        """
        -- The fleet grant a secret came from (NULL: set on this node); the next sync
        -- deletes the secret when its grant is revoked or expires.
        ALTER TABLE secrets ADD COLUMN grant_id TEXT;
        """,
    ),
    Migration(
        "0010_telemetry_buffer",
        """
        -- Telemetry waiting to be sent to the fleet (edgeos.telemetry.buffer): priority 0
        -- alerts, 1 KPIs, 2 traces, 3 logs; when full, the highest priority number goes
        -- first, oldest first. Payloads are redacted before they are written here.
        CREATE TABLE telemetry_buffer (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            priority    INTEGER NOT NULL,
            kind        TEXT NOT NULL,
            at          REAL NOT NULL,
            size        INTEGER NOT NULL,
            payload     TEXT NOT NULL
        );
        CREATE INDEX telemetry_buffer_by_priority ON telemetry_buffer (priority, id);
        -- The batch sent and not yet acknowledged (at most one), compressed as sent.
        CREATE TABLE telemetry_batch (
            seq         INTEGER PRIMARY KEY,
            created_at  REAL NOT NULL,
            records     INTEGER NOT NULL,
            body        BLOB NOT NULL
        );
        -- One row: the next batch sequence, bytes sent on the current day, the first
        -- minute whose KPIs are not collected yet, records dropped since the last batch.
        CREATE TABLE telemetry_uplink (
            id          INTEGER PRIMARY KEY CHECK (id = 1),
            next_seq    INTEGER NOT NULL,
            day         INTEGER NOT NULL,
            day_bytes   INTEGER NOT NULL,
            kpi_minute  INTEGER NOT NULL,
            dropped     TEXT NOT NULL
        );
        INSERT INTO telemetry_uplink VALUES (1, 1, 0, 0, 0, '{}');
        -- The uplink reads the runs that finished in each minute.
        CREATE INDEX runs_by_finish ON runs (finished_at) WHERE finished_at IS NOT NULL;
        """,
    ),
    Migration(
        "0011_traces",
        """
        -- Finished spans of runs' traces (edgeos.telemetry.tracing), the newest kept.
        CREATE TABLE spans (
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            trace_id    TEXT NOT NULL,
            span_id     TEXT NOT NULL,
            parent_id   TEXT,
            name        TEXT NOT NULL,
            start_ns    INTEGER NOT NULL,
            end_ns      INTEGER NOT NULL,
            status      TEXT NOT NULL,
            attributes  TEXT NOT NULL,
            UNIQUE (trace_id, span_id)
        );
        """,
    ),
    Migration(
        "0013_memory_models",
        """
        -- A record embedded again (new model, vector and size) or given a shorter life by
        -- a fleet policy is logged as put again: indexes and replicas take it as it now is.
        CREATE TRIGGER memory_record_changed AFTER UPDATE OF model, expires_at
            ON memory_records BEGIN
            INSERT INTO memory_changes (agent, op, record, record_seq, at)
                VALUES (new.agent, 'put', new.id, new.seq,
                        (julianday('now') - 2440587.5) * 86400.0);
        END;
        CREATE TRIGGER memory_record_resized AFTER UPDATE OF bytes ON memory_records
            WHEN new.bytes != old.bytes BEGIN
            UPDATE memory_usage SET bytes = bytes - old.bytes + new.bytes
                WHERE agent = new.agent;
        END;
        -- The embedding model (name@version) each agent's memory is being brought to, and
        -- how far: records of other models are embedded again in the background.
        CREATE TABLE memory_models (
            agent       TEXT PRIMARY KEY,
            model       TEXT NOT NULL,
            dim         INTEGER NOT NULL,
            since       REAL NOT NULL,
            total       INTEGER NOT NULL,
            done        INTEGER NOT NULL,
            updated_at  REAL NOT NULL
        );
        """,
    ),
    Migration(
        "0014_deferred_tasks",
        """
        -- Routed model calls waiting for an offline venue (edgeos.routing.deferral): the
        -- run is parked as waiting_venue until a venue it waits for is back (resumed) or
        -- the deadline passes (defaulted: the call returns the task's declared default).
        CREATE TABLE deferred_tasks (
            id          TEXT PRIMARY KEY,
            run_id      TEXT NOT NULL,
            agent       TEXT NOT NULL,
            step        TEXT NOT NULL,
            model       TEXT NOT NULL,
            awaiting    TEXT NOT NULL,
            reason      TEXT NOT NULL,
            default_outputs TEXT,
            state       TEXT NOT NULL DEFAULT 'waiting',
            deadline    REAL NOT NULL,
            deferred_at REAL NOT NULL,
            settled_at  REAL
        );
        CREATE INDEX deferred_tasks_waiting ON deferred_tasks (deadline)
            WHERE state = 'waiting';
        CREATE INDEX deferred_tasks_run ON deferred_tasks (run_id);
        -- A parked run is active: the index of active runs covers the new state.
        DROP INDEX runs_active;
        CREATE INDEX runs_active ON runs (state)
            WHERE state IN ('pending', 'running', 'waiting_human', 'waiting_venue', 'paused');
        """,
    ),
    Migration(
        "0015_outbound_queue",
        """
        -- Messages for cloud services waiting for the link (edgeos.routing.outbound), in
        -- the telemetry buffer's shape: priority 0 critical, 1 normal, 2 bulk; when full,
        -- the highest priority number goes first, oldest first.
        CREATE TABLE outbound_messages (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            priority    INTEGER NOT NULL,
            kind        TEXT NOT NULL,
            at          REAL NOT NULL,
            size        INTEGER NOT NULL,
            payload     TEXT NOT NULL
        );
        CREATE INDEX outbound_messages_by_priority ON outbound_messages (priority, id);
        -- The batch sent and not yet acknowledged (at most one), as sent.
        CREATE TABLE outbound_batch (
            seq         INTEGER PRIMARY KEY,
            created_at  REAL NOT NULL,
            records     INTEGER NOT NULL,
            body        BLOB NOT NULL
        );
        -- One row: the next batch sequence and the messages dropped since the last batch.
        CREATE TABLE outbound_state (
            id          INTEGER PRIMARY KEY CHECK (id = 1),
            next_seq    INTEGER NOT NULL,
            dropped     TEXT NOT NULL
        );
        INSERT INTO outbound_state (id, next_seq, dropped) VALUES (1, 1, '{}');
        """,
    ),
    Migration(
        "0016_run_migration",
        """
        -- Envelopes of runs moved between nodes (edgeos.agents.migration), sealed here
        -- (out) or accepted here (in): an envelope is accepted once, so a replayed one is
        -- refused. A sealed envelope is kept (body) until its run comes back or is taken
        -- back after the envelope expired unaccepted.
        CREATE TABLE run_envelopes (
            id          TEXT NOT NULL,
            run_id      TEXT NOT NULL,
            direction   TEXT NOT NULL CHECK (direction IN ('out', 'in')),
            peer        TEXT NOT NULL,
            digest      TEXT NOT NULL,
            at          REAL NOT NULL,
            body        BLOB,
            PRIMARY KEY (id, direction)
        );
        CREATE INDEX run_envelopes_by_run ON run_envelopes (run_id, at);
        -- A run sealed away continues on another node: nothing here may write its
        -- journal or move its row (a step that was in flight, a late failure) until it
        -- comes back, which replaces the row. Its records stay one chain across nodes.
        CREATE TRIGGER journal_of_migrated_run BEFORE INSERT ON journal
            WHEN EXISTS (SELECT 1 FROM runs WHERE id = NEW.run_id AND state = 'migrated')
        BEGIN
            SELECT RAISE(ABORT, 'the run migrated to another node: its journal continues there');
        END;
        CREATE TRIGGER migrated_run_frozen BEFORE UPDATE ON runs
            WHEN OLD.state = 'migrated'
        BEGIN
            SELECT RAISE(ABORT, 'the run migrated to another node: it cannot change here');
        END;
        """,
    ),
    Migration(
        "0017_feedback_by_time",
        """
        -- Feedback is kept for its agent's retention.feedback: the retention pass removes
        -- each agent's oldest rows by time.
        CREATE INDEX feedback_by_agent_time ON feedback (agent, at);
        """,
    ),
    Migration(
        "0018_api_tokens",
        """
        -- Named tokens for the node's HTTP API (edgeos.node.tokens): only the SHA-256 of
        -- each token is kept. Revoked and expired rows stay, for the record.
        CREATE TABLE api_tokens (
            digest      TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            scopes      TEXT NOT NULL,
            created_at  REAL NOT NULL,
            expires_at  REAL,
            revoked_at  REAL
        );
        CREATE INDEX api_tokens_by_name ON api_tokens (name);
        """,
    ),
    Migration(
        "0019_api_token_spend",
        """
        -- What a named token may spend on paid venues through the node's relay in a
        -- sliding day (NULL: no limit), and what it spent: one row per relayed call,
        -- older than a day removed as new ones come.
        ALTER TABLE api_tokens ADD COLUMN cost_per_day REAL;
        CREATE TABLE api_token_spend (
            digest  TEXT NOT NULL,
            at      REAL NOT NULL,
            cost    REAL NOT NULL
        );
        CREATE INDEX api_token_spend_by_token ON api_token_spend (digest, at);
        """,
    ),
    Migration(
        "0020_journal_dictionaries",
        """
        -- zstd dictionaries trained on the node's own journal (edgeos.state.journal): the
        -- payloads compressed with one name it by id. Never removed.
        CREATE TABLE journal_dicts (
            id               INTEGER PRIMARY KEY,
            data             BLOB NOT NULL,
            trained_through  INTEGER NOT NULL,
            at               REAL NOT NULL
        );
        CREATE INDEX journal_dicts_by_training ON journal_dicts (trained_through);
        """,
    ),
    Migration(
        "0021_api_token_last_use",
        """
        -- When each named token was last presented (to the minute): which tokens are
        -- still in use, and which to revoke.
        ALTER TABLE api_tokens ADD COLUMN last_used_at REAL;
        """,
    ),
    Migration(
        "0022_journal_recompressed",
        """
        -- How far records written before the journal's first dictionary have been stored
        -- again with it (edgeos.state.journal.recompress).
        CREATE TABLE journal_recompressed (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            through  INTEGER NOT NULL
        );
        """,
    ),
)
