"""Alembic migrations of the node registry (run through ``cyphonic.registry.db.migrate``)."""
