"""SQL of the comment policy (``run_service.finalize``): the run it decides on, the
retry it marks and the outcome it records in the run's context.

Every function takes the connection of the caller's unit of work; none commits.
"""

from __future__ import annotations

from common.sql import Row, Tx, sql

_POLICY_RUN = sql(
    """
    SELECT id, company_id, agent_id, issue_id, status, wake_reason, retry_reason, context
    FROM runs.heartbeat_runs WHERE id = :id FOR UPDATE
    """
)
_MARK_RETRY = sql(
    """
    UPDATE runs.heartbeat_runs
    SET retry_of_run_id = :of, retry_reason = :why, updated_at = now()
    WHERE id = :id AND retry_of_run_id IS NULL
    """
)
_RECORD_POLICY = sql(
    """
    UPDATE runs.heartbeat_runs
    SET context = context || jsonb_build_object('commentPolicy', CAST(:outcome AS jsonb)),
        updated_at = now()
    WHERE id = :id
    """
)


async def lock_policy_run(tx: Tx, run_id: str) -> Row | None:
    """(id, company_id, agent_id, issue_id, status, wake_reason, retry_reason, context)
    of the run, locked FOR UPDATE; None when it is gone."""
    return await tx.fetchrow(_POLICY_RUN, {"id": run_id})


async def mark_retry(tx: Tx, retry_id: object, of_run_id: str, reason: str) -> None:
    """Record ``retry_id`` as the retry of ``of_run_id`` unless it already retries one."""
    await tx.execute(_MARK_RETRY, {"id": retry_id, "of": of_run_id, "why": reason})


async def record_outcome(tx: Tx, run_id: str, outcome_json: str) -> None:
    """Set ``context.commentPolicy`` of the run to the JSON ``outcome_json``."""
    await tx.execute(_RECORD_POLICY, {"id": run_id, "outcome": outcome_json})
