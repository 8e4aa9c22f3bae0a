"""The consumer of the issue service's outbox: issue events become wakes.

The events (the issue service's ``issue_events``, read through
``run_service.foreign_reads``) are read in id order after the cursor
``runs.consumer_cursors`` row ``run_service.wakes``; the batch's wakes and the cursor
advance commit in one transaction. The cursor row is locked ``FOR UPDATE SKIP LOCKED``:
one replica consumes at a time, the others skip the pass. ``consume_forever`` LISTENs on
``paperclip_issue_events`` and polls as a fallback (notifications can be lost).

Mapping (source ``assignment``; the wake goes to ``target_agent_id``):
``issue.assigned`` -> ``issue_assigned``, ``issue.commented`` -> ``issue_commented``,
``issue.mentioned`` -> ``issue_comment_mentioned``, ``issue.reopened`` ->
``issue_reopened_via_comment``. Every other type is ignored by this consumer;
``issue.force_released`` and ``issue.interrupt_requested`` are run control's: they are
routed to ``run_service.run_interrupts`` (its own cursor), whose pass ``consume_forever``
runs after each of its own when given one (``after_pass``).

Exactly once: each wake carries the idempotency key ``event:<id>``, so a pass that
repeats an event (a crash after the wake but before the cursor, a re-scan) returns the
first wake and writes nothing. An event whose actor is the target agent itself wakes
nobody and writes nothing.

Out-of-order commits: bigserial ids are taken when a row is inserted, not when its
transaction commits, so an event with a lower id can become visible after the cursor
has moved past it. Each pass therefore also re-scans the ``LOOKBACK_IDS`` ids just
behind the cursor for wake-worthy events that have no ``event:<id>`` wake yet (an index
probe on ``UNIQUE(agent_id, idempotency_key)`` per event) and applies them. An event is
missed only if its transaction commits after ``LOOKBACK_IDS`` later events were
consumed, which issue-service transactions (milliseconds, bounded by the statement
timeout) do not do at realistic rates.

Lock order: a wake takes its issue's advisory lock, then its agent's. A batch holds many
such locks until it commits, so it takes all of them up front, every issue lock before
any agent lock, each group sorted: no cycle with ``WakeAgent`` or another batch.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from common.actor import Actor, ActorType, service_actor
from common.db import Database, sqlstate
from common.errors import PaperclipError
from common.notify_loop import run_passes
from common.sql import Row, Tx
from run_service import cursor_store, foreign_reads, wake_store
from run_service import wake_rules as rules
from run_service.wakes import enqueue_wake

logger = logging.getLogger(__name__)

CONSUMER = "run_service.wakes"
CHANNEL = "paperclip_issue_events"
LOOKBACK_IDS = 1000
BATCH = 200
SOURCE = "assignment"
WAKE_REASONS = {
    "issue.assigned": "issue_assigned",
    "issue.commented": "issue_commented",
    "issue.mentioned": "issue_comment_mentioned",
    "issue.reopened": "issue_reopened_via_comment",
}
_RETRYABLE_STATES = frozenset({"40001", "40P01", "55P03"})


def _wake_worthy(event: Row) -> bool:
    """Whether ``event`` wakes its target: a mapped type, a target, not the target's own."""
    target = event["target_agent_id"]
    return (
        event["type"] in WAKE_REASONS and target is not None and event["actor_agent_id"] != target
    )


def _requested_by(event: Row) -> Actor:
    """The actor who wrote the event, as the wake records it."""
    if event["actor_agent_id"] is not None:
        return Actor(
            type=ActorType.AGENT,
            agent_id=str(event["actor_agent_id"]),
            company_id=str(event["company_id"]),
            run_id=None if event["actor_run_id"] is None else str(event["actor_run_id"]),
        )
    if event["actor_type"] == "user":
        return Actor(type=ActorType.BOARD, user_id=event["actor_id"] or "board")
    return service_actor(event["actor_id"] or "service")


async def _apply(tx: Tx, event: Row) -> bool:
    """Turn one event into a wake; whether a wake was recorded (or already was)."""
    if not _wake_worthy(event):
        return False
    agent = await wake_store.agent_for_wake(tx, event["target_agent_id"])
    if agent is None:
        return False
    payload: dict[str, Any] = rules.as_json(event["payload"])
    payload.setdefault("issueId", str(event["issue_id"]))
    payload["eventId"] = event["id"]
    await enqueue_wake(
        tx,
        agent=agent,
        source=SOURCE,
        reason=WAKE_REASONS[event["type"]],
        issue_id=str(event["issue_id"]),
        payload=payload,
        idempotency_key=f"event:{event['id']}",
        requested_by=_requested_by(event),
        source_event_id=int(event["id"]),
    )
    return True


async def _apply_isolated(tx: Tx, event: Row) -> bool:
    """``_apply`` in a savepoint: a bad event is logged and skipped, never retried
    forever; concurrency failures abort the whole pass (it is retried)."""
    try:
        async with tx.conn.transaction():
            return await _apply(tx, event)
    except asyncpg.PostgresError as exc:
        if sqlstate(exc) in _RETRYABLE_STATES:
            raise
        logger.exception("issue event %s could not become a wake; skipped", event["id"])
    except PaperclipError:
        logger.exception("issue event %s could not become a wake; skipped", event["id"])
    return False


async def _lock_all(tx: Tx, events: list[Row]) -> None:
    worthy = [e for e in events if _wake_worthy(e)]
    issues = sorted({f"wake-issue:{e['issue_id']}" for e in worthy})
    agents = sorted({f"wake-agent:{e['target_agent_id']}" for e in worthy})
    for key in [*issues, *agents]:
        await wake_store.lock(tx, key)


async def consume_once(db: Database, *, batch: int = BATCH) -> int:
    """One pass: the events after the cursor (at most ``batch``) and the missed ones
    just behind it become wakes; the cursor advances in the same transaction. The
    number of events read past the cursor (0 if another replica holds the cursor)."""
    async with db.unit_of_work() as tx:
        cursor = await cursor_store.lock_cursor(tx, CONSUMER)
        if cursor is None:
            return 0
        events = await foreign_reads.issue_events_after(tx, cursor, batch)
        missed = await foreign_reads.unwoken_issue_events(
            tx,
            low=max(0, cursor - LOOKBACK_IDS),
            high=cursor,
            types=list(WAKE_REASONS),
            limit=batch,
        )
        await _lock_all(tx, [*missed, *events])
        for event in [*missed, *events]:
            await _apply_isolated(tx, event)
        if events:
            await cursor_store.advance_cursor(tx, CONSUMER, events[-1]["id"])
        return len(events)


async def consume_forever(
    db: Database,
    dsn: str,
    *,
    poll_seconds: float,
    after_pass: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Consume until cancelled: a pass on every NOTIFY on ``paperclip_issue_events``
    and at least every ``poll_seconds``; a full batch is followed at once by another.
    ``after_pass`` (the run-interrupt pass) runs after each pass. ``dsn`` is a plain
    asyncpg DSN for the LISTEN connection."""

    async def one_pass() -> bool:
        try:
            full = await consume_once(db) >= BATCH
        finally:
            if after_pass is not None:
                try:
                    await after_pass()
                except Exception:  # never let it stop the consumer of wakes
                    logger.exception("run-interrupt pass failed; retrying after the poll interval")
        return full

    await run_passes(dsn, CHANNEL, one_pass, interval=poll_seconds, what="outbox pass")
