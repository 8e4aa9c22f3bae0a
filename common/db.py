"""The async database engine and the unit of work of one RPC.

One ``AsyncEngine`` (asyncpg) per process with an explicit pool. A service function
runs in ``async with db.unit_of_work() as tx``: one pooled connection, one transaction,
deferred audit and outbox rows written just before commit, committed on success and
rolled back on any exception, cancellation included. ``db.transaction()`` gives a
SQLAlchemy connection in a transaction instead, for tools and tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from common import tracing
from common.errors import Aborted, PaperclipError, Unavailable
from common.sql import Tx

#: SQLSTATEs that mean "another transaction won; the caller may retry".
_CONCURRENCY_STATES = {
    "40001": "serialization failure",
    "40P01": "deadlock detected",
    "55P03": "lock not available",
}
#: SQLSTATEs of a server that is going away, coming back or full: retry later.
_UNAVAILABLE_STATES = {
    "57P01": "the server is shutting down",
    "57P02": "the server crashed",
    "57P03": "the server is starting up",
    "53300": "too many connections",
}
#: A row lock not granted within this time aborts the statement instead of queueing
#: requests forever behind a stuck transaction.
LOCK_TIMEOUT_MS = 5000
STATEMENT_TIMEOUT_MS = 30000


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE of a driver error, if it carries one."""
    orig = getattr(exc, "orig", exc)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return str(state) if state else None


class Database:
    """The engine of one process and its units of work."""

    def __init__(
        self, url: str, *, pool_size: int = 10, max_overflow: int = 10, name: str = "paperclip"
    ) -> None:
        self.engine: AsyncEngine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            # Connections are recycled before a server-side idle timeout can cut them.
            pool_recycle=1800,
            pool_pre_ping=False,
            connect_args={
                "server_settings": {
                    "application_name": name,
                    "lock_timeout": str(LOCK_TIMEOUT_MS),
                    "statement_timeout": str(STATEMENT_TIMEOUT_MS),
                    "timezone": "UTC",
                }
            },
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One connection in one transaction; driver errors become project errors."""
        try:
            async with self.engine.begin() as conn:
                yield conn
        except DBAPIError as exc:
            mapped = translate_db_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[Tx]:
        """One transaction on a pooled asyncpg connection (see the module docstring)."""
        try:
            # The pool's raw connection, not an engine Connection: a unit of work never
            # executes through SQLAlchemy, and skipping that layer halves the cost of
            # checking a connection out and back in.
            pooled = await self._checkout()
            driver: asyncpg.Connection = pooled.driver_connection  # type: ignore[assignment]
            reusable = False
            try:
                async with driver.transaction():
                    tx = Tx(tracing.sql_connection(driver) if tracing.ENABLED else driver)
                    yield tx
                    await tx.flush()
                reusable = True
            except (asyncpg.PostgresError, PaperclipError):
                # Refused by the server or by a rule: rolled back, the connection is fine.
                reusable = not (driver.is_closed() or driver.is_in_transaction())
                raise
            finally:
                if reusable:
                    await greenlet_spawn(pooled.close)
                else:
                    # Interrupted mid-statement (cancelled, timed out, the server went
                    # away): never hand this connection out again.
                    await greenlet_spawn(pooled.invalidate)
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            OSError,
            DBAPIError,
        ) as exc:
            mapped = translate_db_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    async def _checkout(self) -> PoolProxiedConnection:
        """A pooled connection; a failed connect raises what ``engine.connect()`` would
        (the driver's error wrapped in ``DBAPIError``), which the raw pool does not."""
        dialect = self.engine.dialect
        try:
            return await self.engine.raw_connection()
        except dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(
                None,
                None,
                exc,
                dialect.loaded_dbapi.Error,
                connection_invalidated=dialect.is_disconnect(exc, None, None),
                dialect=dialect,
            ) from exc

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


def translate_db_error(exc: BaseException) -> BaseException:
    """Map a driver error to ``Aborted``/``Unavailable``; other errors pass unchanged."""
    state = sqlstate(exc)
    if state in _CONCURRENCY_STATES:
        return Aborted(
            f"concurrent modification: {_CONCURRENCY_STATES[state]}",
            reason="CONCURRENT_MODIFICATION",
        )
    if state is not None and (state.startswith("08") or state in _UNAVAILABLE_STATES):
        return Unavailable(
            f"database unavailable: {_UNAVAILABLE_STATES.get(state, 'connection failed')}",
            reason="DATABASE_UNAVAILABLE",
        )
    if state is None and isinstance(
        exc,
        (
            InterfaceError,
            OperationalError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            OSError,
        ),
    ):
        return Unavailable("database unavailable", reason="DATABASE_UNAVAILABLE")
    return exc
