"""The database of one bench run: a fresh, migrated database on an embedded PostgreSQL
under the bench's home (or on ``PAPERCLIP_BENCH_DATABASE_URL``'s server), dropped after."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import asyncpg

from common.database_url import asyncpg_dsn, normalize_database_url
from common.migrate import migrate
from local_suite.embedded_pg import EmbeddedPostgres


@contextmanager
def bench_database(home: Path, external: str | None) -> Iterator[str]:
    """Yield the URL of a fresh migrated database; drop it (and stop an embedded server)
    on the way out."""
    with ExitStack() as stack:
        if external:
            server_url = normalize_database_url(external)
        else:
            pg = EmbeddedPostgres.start(home / "pgdata", database="postgres")
            stack.callback(pg.stop)
            server_url = pg.url
        database_url = asyncio.run(_create(server_url))
        stack.callback(lambda: asyncio.run(_drop(server_url, database_url)))
        yield database_url


def _database_in(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


async def _create(server_url: str) -> str:
    name = f"paperclip_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = _database_in(server_url, name)
    await migrate(url)
    return url


async def _drop(server_url: str, url: str) -> None:
    name = url.partition("?")[0].rsplit("/", 1)[1]
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
