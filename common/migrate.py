"""The ``migrate`` step: apply the one Alembic history under a Postgres advisory lock.

Run it once per deployment (a Kubernetes Job, or ``make run`` before the services
start). Replicas that race to migrate queue on the lock; the later ones find nothing
left to do.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from common.config import load_settings
from common.database_url import normalize_database_url

#: Arbitrary, fixed key of the session-level advisory lock held while migrating.
MIGRATION_LOCK_KEY = 0x5041504552  # "PAPER"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def _upgrade(connection: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(database_url: str) -> None:
    """Bring the database at ``database_url`` to the newest schema."""
    engine = create_async_engine(normalize_database_url(database_url), pool_size=1)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            await conn.commit()
            try:
                await conn.run_sync(_upgrade)
                await conn.commit()
            finally:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
                await conn.commit()
    finally:
        await engine.dispose()


def main() -> int:
    """``python -m common.migrate``: migrate ``PAPERCLIP_DATABASE_URL``."""
    settings = load_settings()
    if settings.database_url is None:
        print("PAPERCLIP_DATABASE_URL is not set", file=sys.stderr)
        return 2
    asyncio.run(migrate(settings.database_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
