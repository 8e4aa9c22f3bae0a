"""Passes woken by PostgreSQL notifications, with a poll as the fallback.

A background pass (consume the outbox, stop closed issues' services) runs on every
NOTIFY on its channel and at least every ``interval`` seconds, because notifications are
lost while no listener is connected. A pass that filled its batch is followed at once
by another. The listening connection is re-opened whenever it is found closed; without
one the loop only polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from common import outage
from common.errors import PaperclipError

logger = logging.getLogger(__name__)

#: One pass; True when it filled its batch (more work is waiting).
Pass = Callable[[], Awaitable[bool]]


async def run_passes(dsn: str, channel: str, one_pass: Pass, *, interval: float, what: str) -> None:
    """Run ``one_pass`` until cancelled (see the module docstring). ``dsn`` is a plain
    asyncpg DSN; a failed pass is logged and retried after the interval."""
    notified = asyncio.Event()
    listener: asyncpg.Connection | None = None

    def on_notify(*_: object) -> None:
        notified.set()  # a pass looks at everything: which row changed does not matter

    try:
        while True:
            if listener is None or listener.is_closed():
                listener = await _listen(dsn, channel, on_notify)
            notified.clear()
            try:
                full = await one_pass()
            except (PaperclipError, asyncpg.PostgresError, OSError):
                logger.exception("%s failed; retrying after the poll interval", what)
                full = False
            if full:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(notified.wait(), timeout=interval)
    finally:
        if listener is not None and not listener.is_closed():
            await listener.close()


async def _listen(
    dsn: str, channel: str, callback: Callable[..., None]
) -> asyncpg.Connection | None:
    """A connection LISTENing on ``channel``, or None (polling only) on failure."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(dsn)
        await conn.add_listener(channel, callback)
        return conn
    except (asyncpg.PostgresError, OSError) as exc:
        logger.warning(
            "cannot LISTEN on %s; polling only until the next pass",
            channel,
            extra=outage.tagged(exc, error=str(exc)),
        )
        return None
