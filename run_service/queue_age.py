"""Queued runs that never start end with a clear error instead of waiting for days.

A run still ``queued`` ``max_queued_seconds`` after it was queued (a paused or
over-committed agent, a lock nobody releases, no run-service node with room) ends
``failed`` with error code ``queue_timeout``, through the ordinary terminal write (its
wake ends ``failed``, its terminal event ends a ``WatchRun``) guarded on ``queued``: a
dispatcher that claims the run first wins, and the run goes on. What follows a terminal
write follows (locks released, a deferred wake promoted); an issue left with nothing to
move it is then escalated by the stranded-issue reconciliation (``run_service.reconcile``)
as for any failed run.

One replica at a time: a pass holds a transaction-level advisory try-lock while it reads
the expired runs; each run is then ended on its own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from common import metrics
from common.db import Database
from run_service import finalize, queue_age_store
from run_service.issue_client import IssueClient
from run_service.workspace_client import WorkspaceClient

logger = logging.getLogger(__name__)

ERROR_CODE = "queue_timeout"
#: How often the pass runs.
INTERVAL_SECONDS = 60.0
#: Runs ended per pass at most (the next pass takes the rest).
LIMIT = 500
_LOCK_KEY = "run_service.queue_age"


class Host(Protocol):
    """What the pass needs of the runner: its clients for the after-run steps."""

    issues: IssueClient
    workspaces: WorkspaceClient


async def expire_queued(db: Database, host: Host, max_queued_seconds: int) -> list[str]:
    """End every run queued for longer than ``max_queued_seconds``; their ids."""
    if max_queued_seconds <= 0:
        return []
    async with db.unit_of_work() as tx:
        if not await queue_age_store.try_pass_lock(tx, _LOCK_KEY):
            return []  # another replica's pass is running
        rows = await queue_age_store.expired_queued_runs(
            tx, max_queued_seconds=max_queued_seconds, limit=LIMIT
        )
    ended: list[str] = []
    for row in rows:
        run_id = str(row["id"])
        result = finalize.RunResult(
            "failed",
            ERROR_CODE,
            f"queued for more than {max_queued_seconds} s without starting",
        )
        if not await finalize.finalize_run(db, run_id, result, from_statuses=("queued",)):
            continue  # claimed (or ended) meanwhile
        ended.append(run_id)
        issue_id = str(row["issue_id"]) if row["issue_id"] is not None else None
        await finalize.after_terminal(db, host.issues, run_id, issue_id, workspaces=host.workspaces)
    if ended:
        logger.warning(
            "queued runs expired",
            extra={"runs": len(ended), "max_queued_seconds": max_queued_seconds},
        )
    return ended


async def expire_forever(
    db: Database, host: Host, max_queued_seconds: int, *, interval: float = INTERVAL_SECONDS
) -> None:
    """A pass every ``interval`` seconds until cancelled (a failed pass is logged)."""
    while True:
        try:
            await metrics.timed_pass("run_queue_age", expire_queued(db, host, max_queued_seconds))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("queued-run expiry pass failed; retrying after the interval")
        await asyncio.sleep(interval)
