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
)
