"""The ownership gate on agent writes (update, comment), and what every caller of
``ownership.decide`` shares: the facts of a locked issue row and the adoption of a lock.

An agent writing to its own in-progress issue must be the checkout run, or adopt a
lock nobody holds, or one held by a terminal or missing run. A live holder wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from common.actor import Actor
from common.audit import record_activity
from common.authz import require_agent_run
from common.protoconv import text_or_none
from common.sql import Row, Tx
from issue_service import foreign_reads, store
from issue_service.ownership import (
    Action,
    Holders,
    IssueFacts,
    RunFacts,
    Verdict,
    decide,
    needs_checkout_status,
)


def issue_facts(row: Row, *, open_blockers: Sequence[str] = ()) -> IssueFacts:
    """The ownership facts of a locked issue row."""
    return IssueFacts(
        id=str(row["id"]),
        company_id=str(row["company_id"]),
        status=row["status"],
        assignee_agent_id=text_or_none(row["assignee_agent_id"]),
        checkout_run_id=text_or_none(row["checkout_run_id"]),
        execution_run_id=text_or_none(row["execution_run_id"]),
        open_blockers=tuple(open_blockers),
    )


def run_facts(actor: Actor) -> RunFacts | None:
    """The calling agent and its run (an agent call without a run is refused); None for
    board users and services."""
    if not actor.is_agent:
        return None
    return RunFacts(actor.agent_id, require_agent_run(actor))


async def holders(
    tx: Tx, row: Row, action: Action, run: RunFacts | None, facts: IssueFacts
) -> Holders:
    """The statuses of the runs holding the locks of an issue row locked after its
    terminal check: the execution run's as read with the row; the checkout run's read
    now when ``decide`` can depend on it (:func:`ownership.needs_checkout_status`) and
    the execution run does not hold the checkout too."""
    checkout = text_or_none(row["checkout_run_id"])
    execution = text_or_none(row["execution_run_id"])
    execution_status = row["execution_run_status"] if execution is not None else None
    if checkout is None:
        return Holders(None, execution_status)
    if checkout == execution:
        return Holders(execution_status, execution_status)
    if not needs_checkout_status(action, facts, run):
        return Holders(None, execution_status)
    return Holders(await foreign_reads.run_status(tx, checkout), execution_status)


async def adopt_lock(tx: Tx, actor: Actor, row: Row, run_id: str, *, stale_from: str | None) -> Row:
    """Make ``run_id`` (a run of the acting agent) the checkout and execution run of a
    locked issue row, stamping the execution lock with the agent's name key."""
    already = text_or_none(row["execution_run_id"]) == run_id
    info = await foreign_reads.agent_info(tx, actor.agent_id) if actor.agent_id else None
    updated = await store.update_issue_row(
        tx,
        str(row["id"]),
        {
            "checkout_run_id": run_id,
            "execution_run_id": run_id,
            "execution_agent_name_key": info.name_key
            if info is not None
            else row["execution_agent_name_key"],
            "execution_locked_at": row["execution_locked_at"] if already else datetime.now(UTC),
        },
    )
    if stale_from is not None:
        record_activity(
            tx,
            actor=actor,
            company_id=str(row["company_id"]),
            action="issue.checkout_lock_adopted",
            entity_type="issue",
            entity_id=str(row["id"]),
            details={
                "previousCheckoutRunId": stale_from,
                "checkoutRunId": run_id,
                "reason": "stale_checkout_run",
            },
        )
    return updated


async def enforce_agent_write(
    tx: Tx, actor: Actor, row: Row, *, allow_non_assignee: bool = False
) -> Row:
    """Apply the gate for ``actor`` on a locked issue row (after its terminal check);
    the row after any adoption.

    Board users, services and writes to unassigned issues pass. ``allow_non_assignee``
    lets other agents of the company append (comments) without owning the issue.
    """
    run = run_facts(actor)
    action = Action.APPEND if allow_non_assignee else Action.WRITE
    facts = issue_facts(row)
    decision = decide(action, facts, None, run, await holders(tx, row, action, run, facts))
    if decision.refusal is not None:
        raise decision.refusal.exception()
    if decision.verdict is Verdict.KEEP:
        return row
    assert run is not None and decision.verdict is Verdict.TAKE_OVER, decision
    return await adopt_lock(tx, actor, row, run.run_id, stale_from=decision.stale_from)
