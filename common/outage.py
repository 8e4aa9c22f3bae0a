"""Database outages, as one process sees them: health, and logs that stay small.

:func:`watch_database` asks the database a trivial question every second (bounded by a
timeout, so a server that hangs counts as down). While it gets no answer the process
reports NOT_SERVING for its services and for ``""`` (its liveness name,
``channels.LIVE_HEALTH_SERVICE``, stays SERVING: callers still reach it and are told
``DATABASE_UNAVAILABLE``), and SERVING again as soon as an answer comes back.

The outage is logged when it starts (at the first check that fails, or the first record
of a failure caused by it, whichever comes first) and when it ends (with how long it
lasted and how many messages were folded into it). In between, :class:`OutageLogFilter` drops the
records that only repeat it — every failed call, pass or retry caused by the database
being unavailable — and writes one summary line per ``SUMMARY_EVERY_S`` instead: a
30-second outage under load writes a handful of lines, not one per retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from common.db import Database, translate_db_error
from common.errors import Unavailable
from common.metrics import DATABASE_UP
from common.sql import sql

logger = logging.getLogger("paperclip.outage")

REASON = "DATABASE_UNAVAILABLE"
CHECK_INTERVAL_S = 1.0
CHECK_TIMEOUT_S = 2.0
SUMMARY_EVERY_S = 60.0
_PING = sql("SELECT 1")


class Outage:
    """Whether the database is down for this process, since when, and what the log
    filter folded meanwhile."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.ended_at: float | None = None
        #: A :func:`watch_database` runs in this process (and ends what begins).
        self.watched = False
        self.folded = 0
        self._last_summary = 0.0

    @property
    def active(self) -> bool:
        return self.down_since is not None

    def begin(self, error: str) -> None:
        if self.down_since is not None:
            return
        self.down_since = self._last_summary = time.monotonic()
        self.folded = 0
        DATABASE_UP.set(0)
        logger.error("database unavailable", extra={"reason": REASON, "error": error})

    def end(self) -> None:
        if self.down_since is None:
            return
        self.ended_at = time.monotonic()
        DATABASE_UP.set(1)
        lasted = self.ended_at - self.down_since
        self.down_since = None
        logger.warning(
            "database available again",
            extra={"down_s": round(lasted, 1), "folded_messages": self.folded},
        )

    def ended_within(self, seconds: float) -> bool:
        """Whether an outage ended less than ``seconds`` ago (or is still on)."""
        if self.down_since is not None:
            return True
        return self.ended_at is not None and time.monotonic() - self.ended_at < seconds

    def fold(self) -> bool:
        """Count one more repeated message; True when a summary is due."""
        self.folded += 1
        now = time.monotonic()
        if now - self._last_summary >= SUMMARY_EVERY_S:
            self._last_summary = now
            return True
        return False


#: This process's view (one database per process).
OUTAGE = Outage()


def is_database_unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) says the database cannot be reached."""
    seen = 0
    while exc is not None and seen < 8:
        mapped = translate_db_error(exc)
        if isinstance(mapped, Unavailable) and mapped.reason == REASON:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def tagged(exc: BaseException, **extra: object) -> dict[str, object]:
    """``extra`` for a log record about ``exc``: with ``reason`` DATABASE_UNAVAILABLE when
    that is what it is, so the record folds into an ongoing outage."""
    if is_database_unavailable(exc):
        return {**extra, "reason": REASON}
    return dict(extra)


class OutageLogFilter(logging.Filter):
    """Drops records that repeat an ongoing database outage (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == logger.name:
            return True
        about_it = getattr(record, "reason", None) == REASON or (
            record.exc_info is not None and is_database_unavailable(record.exc_info[1])
        )
        if not about_it:
            return True
        if not OUTAGE.active:
            if not OUTAGE.watched:
                return True  # no check runs here that would end it
            # The first sign of it, before the next check: the outage starts here (the
            # check ends it once the database answers), and this record is shown.
            OUTAGE.begin(record.getMessage())
            return True
        if OUTAGE.fold():
            logger.warning(
                "database still unavailable",
                extra={
                    "down_s": round(time.monotonic() - (OUTAGE.down_since or 0.0), 1),
                    "folded_messages": OUTAGE.folded,
                },
            )
        return False


async def _ping(db: Database) -> str | None:
    """None when the database answers, else why not."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            async with db.unit_of_work() as tx:
                await tx.fetchval(_PING)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_S:g} s"
    except Exception as exc:  # a database that cannot answer SELECT 1 serves nothing
        return str(exc) or type(exc).__name__
    return None


async def watch_database(
    db: Database,
    servicer: health.aio.HealthServicer | None,
    names: Sequence[str],
    *,
    interval: float = CHECK_INTERVAL_S,
) -> None:
    """Keep ``names`` (and ``""``) NOT_SERVING while ``db`` does not answer, SERVING
    while it does, until cancelled. Without a ``servicer`` (the gateway, whose health
    follows its backends) only the outage's log lines are kept."""
    serving: bool | None = None
    OUTAGE.watched = True
    while True:
        error = await _ping(db)
        if error is None:
            OUTAGE.end()
        else:
            OUTAGE.begin(error)
        now_serving = error is None
        if servicer is not None and now_serving != serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if now_serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in (*names, ""):
                await servicer.set(name, status)
            serving = now_serving
        await asyncio.sleep(interval)
