"""SQL of the stranded-issue pass (``run_service.reconcile``): its one-replica lock,
the candidates (agent-assigned open issues with nothing moving them, and the latest run
of each), and the retry mark of a recovery run.

Every function takes the connection of the caller's unit of work; none commits.
"""

from __future__ import annotations

from collections.abc import Collection

from common.sql import Row, Tx, sql
from run_service import foreign_reads

_TRY_LOCK = sql("SELECT pg_try_advisory_xact_lock(hashtextextended(:key, 0))")

#: The candidates the decision table skips (read after the actionable ones).
_SKIP_SQL = """
    (c.status = 'todo' AND (l.id IS NULL OR l.status = 'succeeded'))
    OR (c.status = 'in_progress' AND l.id IS NULL
        AND c.checkout_run_id IS NULL AND c.execution_run_id IS NULL)
"""


def _candidates_sql(where: str, tail: str) -> str:
    """The candidates narrowed by the condition ``where``, then ``tail`` (order, limit)."""
    return f"""
    WITH c AS (
        SELECT i.id AS issue_id, i.company_id, i.status, i.checkout_run_id,
               i.execution_run_id, a.id AS agent_id
        FROM runs.agents a
        {foreign_reads.ASSIGNED_OPEN_ISSUES_JOIN}
        WHERE a.status = 'active' AND i.assignee_user_id IS NULL
          AND i.company_id = a.company_id
          AND {where}
          AND NOT EXISTS (
              SELECT 1 FROM runs.heartbeat_runs r
              WHERE r.issue_id = i.id AND r.status IN ('queued', 'running'))
          AND NOT EXISTS (
              SELECT 1 FROM runs.wakeup_requests w
              WHERE w.issue_id = i.id AND w.status = 'deferred')
    )
    SELECT c.*, l.id AS run_id, l.status AS run_status, l.retry_reason, l.error_code,
           l.error
    FROM c
    LEFT JOIN LATERAL (
        SELECT r.id, r.status, r.retry_reason, r.error_code, r.error
        FROM runs.heartbeat_runs r
        WHERE r.issue_id = c.issue_id AND r.agent_id = c.agent_id
        ORDER BY r.created_at DESC, r.id DESC
        LIMIT 1
    ) l ON true
    {tail}
    """


CANDIDATES = sql(
    _candidates_sql(
        "(CAST(:companies AS uuid[]) IS NULL OR a.company_id = ANY(CAST(:companies AS uuid[])))",
        f"ORDER BY (CASE WHEN {_SKIP_SQL} THEN 1 ELSE 0 END), c.issue_id LIMIT :limit",
    )
)
_ONE_CANDIDATE = sql(_candidates_sql("i.id = :issue AND a.id = :agent", ""))
_MARK_RETRY = sql(
    """
    UPDATE runs.heartbeat_runs
    SET retry_of_run_id = CAST(:previous AS uuid), retry_reason = :retry, updated_at = now()
    WHERE id = :run
    """
)


async def try_pass_lock(tx: Tx, key: str) -> bool:
    """Take the transaction-level advisory lock ``key`` if it is free."""
    return bool(await tx.fetchval(_TRY_LOCK, {"key": key}))


async def candidates(tx: Tx, *, company_ids: Collection[str] | None, limit: int) -> list[Row]:
    """Up to ``limit`` candidates (of ``company_ids``; None: every company), the
    actionable ones first, each with its latest run (run_id, run_status, retry_reason,
    error_code, error; null without one)."""
    return await tx.fetch(
        CANDIDATES,
        {"companies": None if company_ids is None else list(company_ids), "limit": limit},
    )


async def one_candidate(tx: Tx, issue_id: str, agent_id: str) -> Row | None:
    """The issue as a candidate of the agent (as :func:`candidates` reads it), or None
    when it is not one."""
    return await tx.fetchrow(_ONE_CANDIDATE, {"issue": issue_id, "agent": agent_id})


async def mark_retry(tx: Tx, run_id: object, previous: str | None, reason: str) -> None:
    """Record the recovery run as the retry of ``previous`` (None: no earlier run)."""
    await tx.execute(_MARK_RETRY, {"previous": previous, "retry": reason, "run": run_id})
