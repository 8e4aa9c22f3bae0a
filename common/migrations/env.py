"""Alembic environment: migrations always run on the connection ``common.migrate`` hands in.

That connection already holds the migration advisory lock, so replicas starting
together never migrate concurrently.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


_connection = context.config.attributes.get("connection")
if _connection is None:
    raise RuntimeError("run migrations with `python -m common.migrate`")
run_on(_connection)
