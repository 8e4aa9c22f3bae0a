"""The stale-lock sweep: the backstop that converges locks whose run is gone.

The run service releases a run's locks right after its terminal write; if that call
is lost (a peer down, a crash in between), this sweep clears locks held by terminal or
missing runs. One replica at a time (a transaction-scoped advisory lock), a bounded
batch per pass, rows other transactions hold are skipped and picked up next pass.
"""

from __future__ import annotations

import asyncio
import logging

from common import metrics
from common.actor import SYSTEM_ACTOR
from common.audit import record_activity
from common.db import Database
from common.protoconv import text_or_none
from common.sql import sql

log = logging.getLogger("paperclip.issue_service.sweeper")

SWEEP_LOCK_KEY = 0x50415045_01
DEFAULT_INTERVAL_SECONDS = 30.0
DEFAULT_BATCH = 200

_SWEEP = sql(
    """
    WITH stale AS (
        SELECT i.id, i.company_id, i.checkout_run_id, i.execution_run_id
        FROM issues.issues i
        WHERE (i.execution_run_id IS NOT NULL OR i.checkout_run_id IS NOT NULL)
          AND NOT EXISTS (
              SELECT 1 FROM runs.heartbeat_runs r
              WHERE r.id IN (i.execution_run_id, i.checkout_run_id)
                AND r.status IN ('queued', 'running'))
        ORDER BY i.id
        LIMIT :batch
        FOR UPDATE OF i SKIP LOCKED
    )
    UPDATE issues.issues AS issues
    SET checkout_run_id = NULL, execution_run_id = NULL, execution_agent_name_key = NULL,
        execution_locked_at = NULL, updated_at = now()
    FROM stale
    WHERE issues.id = stale.id
    RETURNING stale.id, stale.company_id, stale.checkout_run_id, stale.execution_run_id
    """
)


async def sweep_once(db: Database, *, batch: int = DEFAULT_BATCH) -> list[str]:
    """One bounded pass; the ids of the issues whose stale locks were cleared.

    Returns nothing when another replica is sweeping at the same moment.
    """
    async with db.unit_of_work() as tx:
        got = await tx.fetchval(sql("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SWEEP_LOCK_KEY})
        if not got:
            return []
        rows = await tx.fetch(_SWEEP, {"batch": batch})
        for row in rows:
            record_activity(
                tx,
                actor=SYSTEM_ACTOR,
                company_id=str(row["company_id"]),
                action="issue.stale_lock_reconciled",
                entity_type="issue",
                entity_id=str(row["id"]),
                details={
                    "issueId": str(row["id"]),
                    "prevCheckoutRunId": text_or_none(row["checkout_run_id"]),
                    "prevExecutionRunId": text_or_none(row["execution_run_id"]),
                    "clearAssignee": False,
                    "source": "sweep",
                },
            )
        return [str(row["id"]) for row in rows]


async def sweep_forever(db: Database, *, interval: float = DEFAULT_INTERVAL_SECONDS) -> None:
    """Sweep every ``interval`` seconds until cancelled; failures are logged, not fatal."""
    while True:
        await asyncio.sleep(interval)
        try:
            cleared = await metrics.timed_pass("issue_lock_sweep", sweep_once(db))
            if cleared:
                log.info("stale locks cleared", extra={"issues": len(cleared)})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stale-lock sweep failed")
