"""SQL of checkout and release: the conditional checkout UPDATE and the one-round-trip
fast paths.

Checkout and release start by locking the issue row. On the common path the rule
(``ownership.decide``) lets the change through untouched: no terminal execution run to
clear, no adoption, no idempotent repeat, no live holder to ask about. For that path
the first statement also makes the change: a ``locked`` CTE takes the row lock, and an
UPDATE applies only when the locked row satisfies those preconditions (``ownership``
says how each WHERE relates to ``decide``). The statement answers the locked row
(``image`` 0, as before the change) and, when the UPDATE applied, the changed row
(``image`` 1). When the UPDATE did not apply, the slow path works on the locked row.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.sql import Row, Tx, sql
from issue_service import store
from issue_service.model import TERMINAL_RUN_STATUSES

_CHECKOUT_SET_WHERE = """
    SET assignee_agent_id = :agent, assignee_user_id = NULL,
        checkout_run_id = :run, execution_run_id = :run,
        execution_agent_name_key = CASE WHEN CAST(:run AS uuid) IS NULL THEN NULL
                                        ELSE NAME_KEY END,
        execution_locked_at = CASE WHEN CAST(:run AS uuid) IS NULL THEN NULL ELSE now() END,
        status = 'in_progress', started_at = coalesce(started_at, now()), updated_at = now(),
        completed_at = NULL, cancelled_at = NULL
    WHERE id = :id
      AND status = ANY(CAST(:expected AS text[]))
      AND (assignee_agent_id IS NULL
           OR (assignee_agent_id = :agent
               AND (checkout_run_id IS NULL OR checkout_run_id = :run)))
      AND (execution_run_id IS NULL OR execution_run_id = :run)
"""

#: The conditional UPDATE of a checkout, on a row already locked.
CHECKOUT_UPDATE = sql(
    f"UPDATE issues.issues {_CHECKOUT_SET_WHERE.replace('NAME_KEY', ':name_key')} "
    f"RETURNING {store.ISSUE_COLUMNS}"
)

#: The locked row's execution run is missing or live: the terminal check clears nothing.
_EXECUTION_RUN_LIVE = (
    "(l.execution_run_id IS NULL OR NOT (l.execution_run_status = ANY(CAST(:terminal AS text[]))))"
)

#: The locked row and, when it applied, the changed row, in that order.
_IMAGES = """
    SELECT 0 AS image, locked.* FROM locked
    UNION ALL
    SELECT 1 AS image, changed.*, PADDING FROM changed
    ORDER BY image
"""

# Each fast path starts with a comment naming it: pg_stat_activity keeps only the head
# of a statement (1 KiB by default), and these would show only column names there.
_LOCK_AND_CHECK_OUT = sql(
    f"""
    -- checkout: lock the issues.issues row, check it out on the fast path
    WITH locked AS MATERIALIZED ({store.LOCK_FOR_CHECKOUT}),
    changed AS (
        UPDATE issues.issues
        {_CHECKOUT_SET_WHERE.replace("NAME_KEY", "(SELECT agent_name_key FROM locked)")}
          AND EXISTS (
            SELECT FROM locked l
            WHERE l.agent_company_id = l.company_id AND l.agent_status <> 'terminated'
              AND cardinality(l.open_blockers) = 0
              AND {_EXECUTION_RUN_LIVE}
              AND NOT (CAST(:run AS uuid) IS NOT NULL
                       AND l.status = 'in_progress'
                       AND l.assignee_agent_id IS NOT DISTINCT FROM CAST(:agent AS uuid)
                       AND l.checkout_run_id IS NOT DISTINCT FROM CAST(:run AS uuid)
                       AND (l.execution_run_id IS NULL OR l.execution_run_id = :run)))
        RETURNING {store.ISSUE_COLUMNS}
    )
    {_IMAGES.replace("PADDING", "NULL, NULL, NULL, NULL, NULL")}
    """
)

_LOCK_AND_RELEASE = sql(
    f"""
    -- release: lock the issues.issues row, release it on the fast path
    WITH locked AS MATERIALIZED ({store.LOCK_BY_ID}),
    changed AS (
        UPDATE issues.issues
        SET assignee_agent_id = NULL, checkout_run_id = NULL, execution_run_id = NULL,
            execution_agent_name_key = NULL, execution_locked_at = NULL,
            status = CASE WHEN status = 'in_progress' THEN 'todo' ELSE status END,
            updated_at = now()
        WHERE id = :id
          AND EXISTS (
            SELECT FROM locked l
            WHERE {_EXECUTION_RUN_LIVE}
              AND (CAST(:actor_run AS uuid) IS NULL
                   OR NOT (l.status = 'in_progress' AND l.checkout_run_id IS NOT NULL
                           AND l.checkout_run_id <> :actor_run)))
        RETURNING {store.ISSUE_COLUMNS}
    )
    {_IMAGES.replace("PADDING", "NULL")}
    """
)


@dataclass(frozen=True)
class Locked:
    """The locked issue row and, when the fast path applied, the row after the change."""

    row: Row
    changed: Row | None


def _images(rows: list[Row]) -> Locked | None:
    if not rows:
        return None
    return Locked(rows[0], rows[1] if len(rows) > 1 else None)


async def lock_and_check_out(
    tx: Tx, *, issue_id: str, agent_id: str, run_id: str | None, expected: list[str]
) -> Locked | None:
    """Lock the issue (read as ``store.LOCK_FOR_CHECKOUT``) and check it out for
    ``agent_id`` in ``run_id`` when the rules leave it to ``CHECKOUT_UPDATE``: the agent
    exists in the issue's company and is not terminated, no blocker is open, the
    execution run (if any) is live, and the run does not already own the issue. None: no
    such issue."""
    rows = await tx.fetch(
        _LOCK_AND_CHECK_OUT,
        {
            "id": issue_id,
            "agent": agent_id,
            "run": run_id,
            "expected": expected,
            "terminal": sorted(TERMINAL_RUN_STATUSES),
        },
    )
    return _images(rows)


async def lock_and_release(tx: Tx, *, issue_id: str, actor_run_id: str | None) -> Locked | None:
    """Lock the issue (as ``store.lock_issue``) and release it (unassigned, unlocked,
    back to todo when in progress) unless its execution run is terminal or missing, or,
    for an agent in ``actor_run_id``, another run holds its checkout in progress. None:
    no such issue."""
    rows = await tx.fetch(
        _LOCK_AND_RELEASE,
        {"id": issue_id, "actor_run": actor_run_id, "terminal": sorted(TERMINAL_RUN_STATUSES)},
    )
    return _images(rows)


async def check_out(
    tx: Tx,
    *,
    issue_id: str,
    agent_id: str,
    run_id: str | None,
    name_key: str | None,
    expected: list[str],
) -> Row | None:
    """``CHECKOUT_UPDATE`` on the locked issue: the row after, or None when the issue
    is not free for ``agent_id`` in ``run_id`` from one of the ``expected`` statuses."""
    return await tx.fetchrow(
        CHECKOUT_UPDATE,
        {
            "id": issue_id,
            "agent": agent_id,
            "run": run_id,
            "name_key": name_key,
            "expected": expected,
        },
    )
