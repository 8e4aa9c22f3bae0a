"""The wake-loop breaker and agents' daily run budgets: a wake that would start one run
too many is skipped, and the issue says why.

Loop breaker, per (agent, issue, wake reason): once the agent has had
``BreakerPolicy.loop_runs`` runs for that reason on the issue within
``loop_window_seconds`` (default 10 in 30 minutes) with no status change of the issue in
between, the breaker trips: the wake is recorded ``skipped`` with reason
``wake_loop_suspected``, a trip row is written (``runs.wake_breakers``) with an audit
row, and the issue gets one comment by the system explaining it. Further wakes of the
same (agent, issue, reason) are skipped while the trip stands, whatever the window: it
stands until, after it tripped, a board user comments on or changes the issue or its
status changes. Runs are then counted from that moment on. (Comments that made the loop
came before the trip, so they never clear it, even when they were posted as a board
user.) Never waking an agent on its own writes
(``wake_rules.precheck_skip``) comes first; the breaker catches loops through any other
path (a helper posting as the board, an automation, a timer).

Daily run budget, per agent (``RuntimeConfig.daily_run_budget``, off by default): an
agent that has started that many runs in the last 24 hours gets its wakes skipped with
reason ``daily_run_budget_exhausted`` until the count falls below it (or the budget is
raised); the first skip per issue in 24 hours writes a trip row, an audit row and a
comment on the issue.

Only wakes that would queue a new run are checked: a wake merged into an active run
costs nothing. The checks run inside the wake's transaction, under its advisory locks
(``run_service.wakes``), so concurrent wakes of one agent and issue decide one after the
other. Comments are posted after commit by :func:`announce_pending` (the trip row
remembers what is still to announce), so a crash loses none.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from common.actor import service_actor
from common.audit import record_activity
from common.config import Settings
from common.db import Database
from common.errors import NotFound
from common.sql import Tx
from run_service import wake_breaker_store

logger = logging.getLogger(__name__)

LOOP_SUSPECTED = "wake_loop_suspected"
BUDGET_EXHAUSTED = "daily_run_budget_exhausted"
BUDGET_WINDOW_SECONDS = 86_400
NOTICE_SOURCE = "wake_breaker"
_SERVICE = "run_service"

Kind = Literal["wake_loop", "daily_run_budget"]


@dataclass(frozen=True)
class BreakerPolicy:
    """The loop breaker's threshold: ``loop_runs`` runs in ``loop_window_seconds``
    (``loop_runs`` 0: no breaker)."""

    loop_runs: int = 10
    loop_window_seconds: int = 1800

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerPolicy:
        return cls(settings.wake_loop_runs, settings.wake_loop_window_seconds)


_policy = BreakerPolicy()


def configure(policy: BreakerPolicy) -> None:
    """Set the process's policy (the run service does, from its settings, at start)."""
    global _policy  # noqa: PLW0603 - one process-wide setting, like the log level
    _policy = policy


def current_policy() -> BreakerPolicy:
    return _policy


@dataclass(frozen=True)
class Trip:
    """Why a wake is skipped: the skip reason and the count that tripped it."""

    kind: Kind
    skip_reason: str
    runs: int
    window_seconds: int
    #: A trip that starts now (its row and audit row are written with the wake).
    new: bool


async def check(tx: Tx, base: dict[str, Any]) -> Trip | None:
    """The trip that stops the wake ``base`` (``wakes.enqueue_wake``'s fields) from
    queueing a run, recording a new trip; None when it may queue one."""
    trip = await _loop_trip(tx, base) or await _budget_trip(tx, base)
    if trip is not None and trip.new:
        await _record(tx, base, trip)
    return trip


async def _loop_trip(tx: Tx, base: dict[str, Any]) -> Trip | None:
    policy = _policy
    if base["issue"] is None or policy.loop_runs <= 0:
        return None
    row = await wake_breaker_store.loop_state(
        tx,
        company_id=base["company"],
        agent_id=base["agent"],
        issue_id=base["issue"],
        reason=base["reason"],
        window=policy.loop_window_seconds,
    )
    runs, standing = int(row["runs"]), bool(row["standing"])
    if not standing and runs < policy.loop_runs:
        return None
    return Trip("wake_loop", LOOP_SUSPECTED, runs, policy.loop_window_seconds, new=not standing)


async def _budget_trip(tx: Tx, base: dict[str, Any]) -> Trip | None:
    row = await wake_breaker_store.budget_state(
        tx, agent_id=base["agent"], issue_id=base["issue"], window=BUDGET_WINDOW_SECONDS
    )
    if row is None or int(row["budget"]) == 0 or int(row["runs"]) < int(row["budget"]):
        return None
    return Trip(
        "daily_run_budget",
        BUDGET_EXHAUSTED,
        int(row["runs"]),
        BUDGET_WINDOW_SECONDS,
        new=int(row["trips"]) == 0,
    )


async def _record(tx: Tx, base: dict[str, Any], trip: Trip) -> None:
    trip_id = await wake_breaker_store.insert_trip(
        tx,
        {
            "company": base["company"],
            "agent": base["agent"],
            "issue": base["issue"],
            "kind": trip.kind,
            "reason": base["reason"] if trip.kind == "wake_loop" else "",
            "runs": trip.runs,
            "window": trip.window_seconds,
        },
    )
    issue = base["issue"]
    record_activity(
        tx,
        actor=service_actor(_SERVICE),
        company_id=str(base["company"]),
        action=f"run.{trip.skip_reason}",
        entity_type="issue" if issue else "agent",
        entity_id=str(issue or base["agent"]),
        details={
            "tripId": str(trip_id),
            "agentId": str(base["agent"]),
            "issueId": str(issue) if issue else None,
            "wakeReason": base["reason"],
            "runs": trip.runs,
            "windowSeconds": trip.window_seconds,
        },
    )
    logger.warning(
        "wakes stopped",
        extra={
            "reason": trip.skip_reason,
            "agent_id": str(base["agent"]),
            "issue_id": str(issue) if issue else None,
            "wake_reason": base["reason"],
            "runs": trip.runs,
        },
    )


# -- notices ------------------------------------------------------------------------


async def announce_forever(db: Database, issues: Commenter, *, interval: float = 5.0) -> None:
    """:func:`announce_pending` every ``interval`` seconds until cancelled."""
    while True:
        try:
            await announce_pending(db, issues)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("posting wake-breaker notices failed; retrying after the interval")
        await asyncio.sleep(interval)


def notice(kind: str, *, agent_name: str, reason: str, runs: int, window_seconds: int) -> str:
    """The comment that explains a trip on its issue."""
    if kind == "wake_loop":
        minutes = max(1, window_seconds // 60)
        return (
            f"Wakes of @{agent_name} for `{reason}` on this issue are paused: it ran {runs} "
            f"times for that reason within {minutes} minutes with no status change "
            "(suspected wake loop). Comment on the issue or change it to let it run again."
        )
    return (
        f"@{agent_name} has used its daily run budget ({runs} runs in the last 24 hours); "
        "its wakes are skipped until its runs of the last 24 hours fall below the budget "
        "or the budget is raised."
    )


class Commenter(Protocol):
    """What posts a notice (the run service's ``IssueClient``)."""

    async def add_system_comment(
        self, *, issue_id: str, body: str, idempotency_key: str, source: str
    ) -> bool: ...


async def announce_pending(db: Database, issues: Commenter, *, limit: int = 20) -> int:
    """Post the comment of every trip not announced yet (at most ``limit``); how many.
    A comment's key is its trip's id, so a repeat after a crash adds nothing; a trip
    whose issue is gone is marked announced with nothing posted."""
    posted = 0
    async with db.unit_of_work() as tx:
        rows = await wake_breaker_store.pending_trips(tx, limit)
        for row in rows:
            body = notice(
                row["kind"],
                agent_name=row["agent_name"],
                reason=row["reason"],
                runs=int(row["runs"]),
                window_seconds=int(row["window_seconds"]),
            )
            try:
                await issues.add_system_comment(
                    issue_id=str(row["issue_id"]),
                    body=body,
                    idempotency_key=f"wake-breaker:{row['id']}",
                    source=NOTICE_SOURCE,
                )
                posted += 1
            except NotFound:
                logger.info("the issue of a wake breaker is gone", extra={"trip": str(row["id"])})
            await wake_breaker_store.mark_announced(tx, row["id"])
    return posted
