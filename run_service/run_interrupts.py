"""Outbox-driven cancellation: the issue service's ``issue.force_released`` and
``issue.interrupt_requested`` events stop the runs they name (user-asks rows 2 and 26).

- ``issue.force_released``: the previous checkout and execution runs of the payload
  (``previousCheckoutRunId``, ``previousExecutionRunId``) are cancelled if still live,
  reason ``force-released by board``: force-release cancels the holder.
- ``issue.interrupt_requested``: the run of ``payload.runId`` is cancelled if still live,
  reason ``interrupted by board comment``.

A cancel goes through ``run_control.cancel_run`` (as the ``run_service`` service
actor): the local runner kills the tree when this node supervises the run, otherwise the
recorded tree is killed on its host and the terminal write made here (with the NOTIFY
the supervising node acts on); a queued run is cancelled in one transaction. What
follows every terminal write (``ReleaseRunLocks``, promotion of a deferred wake) follows.

The events are read with their own cursor, ``runs.consumer_cursors`` row
``run_service.interrupts``, locked ``FOR UPDATE SKIP LOCKED`` for the pass (one replica
at a time) and advanced after the cancels: a crash re-reads the batch. Idempotent per
event: only runs still ``queued``/``running`` are cancelled, and cancelling a terminal run
changes nothing. Events that commit out of id order are caught by re-reading the
``LOOKBACK_IDS`` ids just behind the cursor (cheap: one probe for live runs).

``run_service.outbox.consume_forever`` runs a pass after each of its own passes (same
NOTIFY channel, same poll), see ``run_service.app``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from common.actor import service_actor
from common.db import Database
from common.errors import PaperclipError
from common.sql import Row
from paperclip.runs.v1 import runs_pb2
from run_service import cursor_store, foreign_reads, run_control, run_store
from run_service import wake_rules as rules

logger = logging.getLogger(__name__)

CONSUMER = "run_service.interrupts"
BATCH = 200
LOOKBACK_IDS = 1000
SERVICE_NAME = "run_service"
FORCE_RELEASED = "issue.force_released"
INTERRUPT_REQUESTED = "issue.interrupt_requested"
REASONS = {
    FORCE_RELEASED: "force-released by board",
    INTERRUPT_REQUESTED: "interrupted by board comment",
}


def named_runs(event: Row) -> list[str]:
    """The run ids an interrupt event asks to stop (in payload order, no repeats)."""
    payload: dict[str, Any] = rules.as_json(event["payload"])
    keys = (
        ("previousCheckoutRunId", "previousExecutionRunId")
        if event["type"] == FORCE_RELEASED
        else ("runId",)
    )
    out: list[str] = []
    for key in keys:
        value = payload.get(key)
        if isinstance(value, str) and value and value not in out:
            out.append(value)
    return out


async def interrupt_once(
    db: Database, runner: run_control.RunControl, *, batch: int = BATCH
) -> int:
    """One pass: the interrupt events after the cursor (at most ``batch``) and those
    just behind it cancel the live runs they name; then the cursor advances. The number
    of new events read (0 when another replica holds the cursor)."""
    async with db.unit_of_work() as guard:
        cursor = await cursor_store.lock_cursor(guard, CONSUMER)
        if cursor is None:
            return 0
        high = await foreign_reads.latest_issue_event_id(guard)
        types = list(REASONS)
        new = await foreign_reads.issue_events_of_types(
            guard, low=cursor, high=high, types=types, limit=batch
        )
        missed = await foreign_reads.issue_events_of_types(
            guard, low=max(0, cursor - LOOKBACK_IDS), high=cursor, types=types, limit=batch
        )
        targets: dict[str, str] = {}
        for event in [*missed, *new]:
            for run_id in named_runs(event):
                targets.setdefault(run_id, REASONS[event["type"]])
        if targets:
            live = await run_store.live_run_ids(guard, list(targets))
            await asyncio.gather(
                *(_cancel(db, runner, str(row["id"]), targets[str(row["id"])]) for row in live)
            )
        next_cursor = int(new[-1]["id"]) if len(new) >= batch else high
        if next_cursor > cursor:
            await cursor_store.advance_cursor(guard, CONSUMER, next_cursor)
        return len(new)


async def _cancel(db: Database, runner: run_control.RunControl, run_id: str, reason: str) -> None:
    try:
        await run_control.cancel_run(
            db,
            runner,
            service_actor(SERVICE_NAME),
            runs_pb2.CancelRunRequest(run_id=run_id, reason=reason),
        )
        logger.info("run cancelled by an issue event", extra={"run_id": run_id, "reason": reason})
    except PaperclipError:
        logger.exception("run named by an issue event not cancelled", extra={"run_id": run_id})
