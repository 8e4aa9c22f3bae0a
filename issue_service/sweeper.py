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
from issue_service import lock_store

log = logging.getLogger("paperclip.issue_service.sweeper")

SWEEP_LOCK_KEY = 0x50415045_01
DEFAULT_INTERVAL_SECONDS = 30.0
DEFAULT_BATCH = 200


async def sweep_once(db: Database, *, batch: int = DEFAULT_BATCH) -> list[str]:
    """One bounded pass; the ids of the issues whose stale locks were cleared.

    Returns nothing when another replica is sweeping at the same moment.
    """
    async with db.unit_of_work() as tx:
        if not await lock_store.try_sweep_lock(tx, SWEEP_LOCK_KEY):
            return []
        rows = await lock_store.sweep_stale_locks(tx, batch)
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
