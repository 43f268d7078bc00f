"""The node database: one SQLite file in WAL mode holding all node state."""

from edgeos.state.database import Compaction, Database, file_bytes
from edgeos.state.migrations import MIGRATIONS, Migration

__all__ = ["MIGRATIONS", "Compaction", "Database", "Migration", "file_bytes"]
