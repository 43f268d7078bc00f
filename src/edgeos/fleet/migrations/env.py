"""Alembic environment: migrates the connection ``FleetDatabase.migrate`` hands over.

There is no alembic.ini: the fleet runs migrations itself, at start-up.
"""

from __future__ import annotations

from alembic import context

from edgeos.fleet.tables import metadata

# Any number taken by no other advisory lock: replicas starting together migrate one at a time.
_MIGRATION_LOCK = 0x6564_6765_6F73


def run_migrations_online() -> None:
    """Run every pending revision on the given connection."""
    connection = context.config.attributes["connection"]
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
