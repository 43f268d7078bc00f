"""The node database: one SQLite file in WAL mode holding all node state."""

from edgeos.state.database import Database
from edgeos.state.migrations import MIGRATIONS, Migration

__all__ = ["MIGRATIONS", "Database", "Migration"]
