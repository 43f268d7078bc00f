"""What is kept on disk, as a test looking for data that must not be there reads it.

A file's bytes miss what the node compresses: journal payloads are stored compressed
(zlib, or zstd with the node's own dictionary), so a secret in one would not show in the
raw file. Here a database file's
bytes come with its journal's payloads inflated after them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

from edgeos.state import journal


def journal_payloads(path: Path) -> bytes:
    """Every journal payload of the SQLite database at ``path`` as JSON, one per line;
    nothing for a database without a journal or a file that is not a database."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        try:
            rows = conn.execute("SELECT payload FROM journal").fetchall()
        except sqlite3.DatabaseError:  # not a database, or one without a journal
            return b""
        return b"\n".join(journal.payload_bytes(payload, conn) for (payload,) in rows)


def stored_bytes(paths: Iterable[Path]) -> bytes:
    """The files' bytes, each ``.db`` file's inflated journal payloads after its own."""
    parts = []
    for path in paths:
        parts.append(path.read_bytes())
        if path.suffix == ".db":
            parts.append(journal_payloads(path))
    return b"\n".join(parts)
