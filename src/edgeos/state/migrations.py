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
)
