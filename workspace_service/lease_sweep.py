"""The lease sweep: the backstop that converges leases nobody ended (user asks row 23).

Two kinds of active lease are ended each pass:

- held by a run that has ended or is missing: the same mapping as ``ReleaseRunLeases``
  (the run service calls that right after a run's terminal write; this catches the
  calls that were lost, a peer down or a crash in between);
- past their expiry (not renewed within the TTL): ``expired``, reason ``ttl_expired``.

One replica at a time (a transaction-scoped advisory lock), a bounded batch of each kind
per pass, rows other transactions hold are skipped (``SKIP LOCKED``) and picked up by a
later pass. A pass that filled a batch is followed by another at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from common import metrics
from common.actor import SYSTEM_ACTOR
from common.db import Database
from workspace_service import lease_store
from workspace_service.lease_store import Ending

log = logging.getLogger("paperclip.workspace_service.lease_sweep")

SWEEP_LOCK_KEY = "workspace_service.lease_sweep"
DEFAULT_BATCH = 500


@dataclass(frozen=True)
class SweepResult:
    """What one pass ended: lease ids expired by TTL and released with their run."""

    expired: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    #: False when another replica held the sweep lock (nothing was looked at).
    ran: bool = True

    def filled(self, batch: int) -> bool:
        """Whether either kind hit the batch limit (more may be waiting)."""
        return len(self.expired) >= batch or len(self.released) >= batch


async def sweep_once(db: Database, *, batch: int = DEFAULT_BATCH) -> SweepResult:
    """One bounded pass (see the module docstring); audited like the RPCs that end
    leases, as the system actor."""
    async with db.unit_of_work() as tx:
        if not await lease_store.try_sweep_lock(tx, SWEEP_LOCK_KEY):
            return SweepResult(ran=False)
        # Leases of ended runs first: the run's outcome says more than a lapsed TTL.
        rows = await lease_store.leases_of_ended_runs(tx, batch)
        released = await lease_store.end_leases(
            tx,
            [
                lease_store.ending_for_run(str(row["id"]), row if row["found"] else None)
                for row in rows
            ],
            actor=SYSTEM_ACTOR,
            source="sweep",
        )
        lapsed = await lease_store.lapsed_leases(tx, batch)
        expired = await lease_store.end_leases(
            tx,
            [
                Ending(str(row["id"]), lease_store.EXPIRED, lease_store.TTL_EXPIRED)
                for row in lapsed
            ],
            actor=SYSTEM_ACTOR,
            source="sweep",
        )
    return SweepResult(
        expired=[lease.id for lease in expired], released=[lease.id for lease in released]
    )


async def sweep_forever(db: Database, *, interval: float, batch: int = DEFAULT_BATCH) -> None:
    """Sweep every ``interval`` seconds until cancelled (at once again after a full
    batch); failures are logged, never fatal."""
    while True:
        result = SweepResult()
        try:
            result = await metrics.timed_pass("workspace_lease_sweep", sweep_once(db, batch=batch))
            if result.expired or result.released:
                log.info(
                    "leases swept",
                    extra={"expired": len(result.expired), "released": len(result.released)},
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("lease sweep failed")
        if not result.filled(batch):
            await asyncio.sleep(interval)
