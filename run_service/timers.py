"""Timer wakes: agents with ``heartbeat_interval_seconds`` > 0.

An active agent is *due* when ``now >= base + interval + jitter``, where ``base`` is its
``agent_runtime_state.last_heartbeat_at`` (written by every terminal run write, and by
this module when it records a timer wake), or the agent's creation time before either
happened, and ``jitter`` is deterministic per agent: the first 32 bits of
``md5(agent_id)`` modulo ``max(1, interval // 10)`` seconds (agents of one interval do
not all fire in the same tick; the same agent always fires at the same offset).

A due agent gets exactly one timer wake (source ``timer``, reason ``heartbeat_timer``),
then ``last_heartbeat_at`` moves to now: after any downtime, however long, there is one
wake and then the next one an interval later -- never a burst of catch-up wakes. The
move is a compare-and-set on the value the tick read, in the wake's transaction, and the
wake's idempotency key names that value, so a wake is recorded at most once per slot
even if two ticks race. ``wakes.enqueue_wake`` coalesces it into the agent's queued (or
else running) issue-less run.

One replica at a time (``pg_try_advisory_xact_lock`` held for the tick); at most
``limit`` agents per tick, the most overdue first.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from common import metrics
from common.actor import service_actor
from common.db import Database
from run_service import timer_store, wake_store
from run_service.wakes import enqueue_wake

logger = logging.getLogger(__name__)

SOURCE = "timer"
REASON = "heartbeat_timer"
SCHEDULER = "heartbeat_scheduler"
#: Agents woken per tick at most.
DEFAULT_LIMIT = 200
#: Seconds between two ticks of the periodic job.
TICK_SECONDS = 5.0
PASS_LOCK_KEY = "run_service.timer_tick"


def jitter_seconds(agent_id: str, interval: int) -> int:
    """The agent's fixed offset within its interval, in whole seconds (its SQL twin is
    in :mod:`run_service.timer_store`)."""
    digest = int(hashlib.md5(agent_id.encode()).hexdigest()[:8], 16)
    return digest % max(1, interval // 10)


@dataclass
class TimerTick:
    """What one tick did: agents found due, and what became of their wakes."""

    checked: int = 0
    enqueued: int = 0
    coalesced: int = 0
    skipped: int = 0


async def tick_timers(
    db: Database,
    *,
    company_ids: Collection[str] | None = None,
    limit: int = DEFAULT_LIMIT,
) -> TimerTick:
    """One tick (see the module docstring). ``company_ids`` limits it to those
    companies (tests share one database); None covers every company."""
    result = TimerTick()
    async with db.unit_of_work() as guard:
        if not await timer_store.try_tick_lock(guard, PASS_LOCK_KEY):
            return result
        companies = None if company_ids is None else list(company_ids)
        due = await timer_store.due_agents(guard, companies=companies, limit=limit)
        for row in due:
            result.checked += 1
            status = await _wake(db, str(row["id"]), row["last"], row["base"])
            if status == "queued":
                result.enqueued += 1
            elif status == "coalesced":
                result.coalesced += 1
            else:
                result.skipped += 1
    return result


async def _wake(db: Database, agent_id: str, last: Any, base: Any) -> str | None:
    """One agent's timer wake; the wake's status, None when another writer moved the
    agent's base first."""
    async with db.unit_of_work() as tx:
        agent = await wake_store.agent_for_wake(tx, agent_id)
        if agent is None:
            return None
        if not await timer_store.claim_timer_slot(tx, agent_id, last):
            return None
        wake, _ = await enqueue_wake(
            tx,
            agent=agent,
            source=SOURCE,
            reason=REASON,
            issue_id=None,
            payload={"source": "scheduler", "reason": "interval_elapsed"},
            idempotency_key=f"timer:{base.isoformat()}",
            requested_by=service_actor(SCHEDULER),
        )
        return str(wake["status"])


async def tick_forever(db: Database, *, interval: float = TICK_SECONDS) -> None:
    """A tick every ``interval`` seconds until cancelled (a failed tick is logged)."""
    while True:
        try:
            await metrics.timed_pass("run_timer_tick", tick_timers(db))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("timer tick failed; retrying after the interval")
        await asyncio.sleep(interval)
