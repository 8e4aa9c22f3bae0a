"""The ownership gate on agent writes (update, comment, release) and lock adoption.

An agent writing to its own in_progress issue must be the checkout run, or adopt a
lock nobody holds, or one held by a terminal or missing run. A live holder wins.
"""

from __future__ import annotations

from datetime import UTC, datetime

from common.actor import Actor
from common.audit import record_activity
from common.authz import require_agent_run
from common.errors import FailedPrecondition, PermissionDenied
from common.protoconv import text_or_none
from common.sql import Row, Tx
from issue_service import store
from issue_service.model import Status, run_is_stale


def conflict_metadata(row: Row, **extra: str) -> dict[str, str]:
    """The machine-readable description of who holds an issue."""
    data = {
        "issue_id": str(row["id"]),
        "status": row["status"],
        "assignee_agent_id": text_or_none(row["assignee_agent_id"]) or "",
        "checkout_run_id": text_or_none(row["checkout_run_id"]) or "",
        "execution_run_id": text_or_none(row["execution_run_id"]) or "",
    }
    data.update(extra)
    return data


async def adopt_lock(tx: Tx, actor: Actor, row: Row, run_id: str, *, stale_from: str | None) -> Row:
    """Make ``run_id`` (a run of the acting agent) the checkout and execution run of a
    locked issue row, stamping the execution lock with the agent's name key."""
    already = text_or_none(row["execution_run_id"]) == run_id
    info = await store.agent_info(tx, actor.agent_id) if actor.agent_id else None
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
    """Apply the gate for ``actor`` on a locked issue row; the row after any adoption.

    Board users, services and writes to unassigned issues pass. ``allow_non_assignee``
    lets other agents of the company append (comments) without owning the issue.
    """
    if not actor.is_agent:
        return row
    run_id = require_agent_run(actor)
    assignee = text_or_none(row["assignee_agent_id"])
    if assignee is None:
        return row
    if assignee != actor.agent_id:
        if allow_non_assignee:
            return row
        if row["status"] == Status.IN_PROGRESS:
            raise FailedPrecondition(
                "issue is checked out by another agent",
                reason="ISSUE_OWNERSHIP_CONFLICT",
                metadata=conflict_metadata(
                    row, actor_agent_id=actor.agent_id or "", actor_run_id=run_id
                ),
            )
        raise PermissionDenied(
            "agent cannot change another agent's issue",
            reason="AGENT_MISMATCH",
            metadata={"issue_id": str(row["id"]), "assignee_agent_id": assignee},
        )
    if row["status"] != Status.IN_PROGRESS:
        return row
    return await _assert_checkout_owner(tx, actor, row, run_id)


async def _assert_checkout_owner(tx: Tx, actor: Actor, row: Row, run_id: str) -> Row:
    checkout = text_or_none(row["checkout_run_id"])
    execution = text_or_none(row["execution_run_id"])
    if checkout == run_id:
        return row
    if checkout is None and execution in (None, run_id):
        return await adopt_lock(tx, actor, row, run_id, stale_from=None)
    # Any execution run still set is live (the caller cleared a terminal one): a stale
    # checkout never hands over a live run's execution lock.
    if (
        checkout is not None
        and execution in (None, run_id)
        and run_is_stale(await store.run_status(tx, checkout))
    ):
        return await adopt_lock(tx, actor, row, run_id, stale_from=checkout)
    raise FailedPrecondition(
        "issue run ownership conflict",
        reason="ISSUE_OWNERSHIP_CONFLICT",
        metadata=conflict_metadata(
            row,
            actor_agent_id=actor.agent_id or "",
            actor_run_id=run_id,
            holder_run_id=(execution if execution not in (None, run_id) else checkout) or "",
            holder_live="true",
        ),
    )
