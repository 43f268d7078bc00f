"""Alembic migrations of the fleet database (run by ``FleetDatabase.migrate``)."""
