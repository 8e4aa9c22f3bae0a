"""SQL for the execution and checkout locks of issues outside checkout and release:
the terminal-run clear, the internal lock operations and the stale-lock sweep."""

from __future__ import annotations

from common.sql import Row, Tx, sql
from issue_service.foreign_reads import LIVE_LOCK_HOLDER
from issue_service.store import ISSUE_COLUMNS

_CLEAR_EXECUTION = sql(
    f"""
    UPDATE issues.issues
    SET execution_run_id = NULL, execution_agent_name_key = NULL,
        execution_locked_at = NULL, updated_at = now(),
        checkout_run_id = CASE WHEN :with_checkout AND checkout_run_id = :run THEN NULL
                               ELSE checkout_run_id END
    WHERE id = :id AND execution_run_id = :run
    RETURNING {ISSUE_COLUMNS}
    """
)
_TAKE_EXECUTION = sql(
    f"""
                UPDATE issues.issues SET execution_run_id = :run,
                    execution_agent_name_key = :name, execution_locked_at = now(),
                    updated_at = now()
                WHERE id = :id AND execution_run_id IS NULL
                RETURNING {ISSUE_COLUMNS}
                """
)
_LOCK_HELD_BY = sql(
    "SELECT id, company_id, checkout_run_id, execution_run_id "
    "FROM issues.issues WHERE execution_run_id = :r OR checkout_run_id = :r "
    "ORDER BY id FOR UPDATE"
)
_TRY_SWEEP_LOCK = sql("SELECT pg_try_advisory_xact_lock(:k)")
_SWEEP = sql(
    f"""
    WITH stale AS (
        SELECT i.id, i.company_id, i.checkout_run_id, i.execution_run_id
        FROM issues.issues i
        WHERE (i.execution_run_id IS NOT NULL OR i.checkout_run_id IS NOT NULL)
          AND NOT EXISTS (
              {LIVE_LOCK_HOLDER})
        ORDER BY i.id
        LIMIT :batch
        FOR UPDATE OF i SKIP LOCKED
    )
    UPDATE issues.issues AS issues
    SET checkout_run_id = NULL, execution_run_id = NULL, execution_agent_name_key = NULL,
        execution_locked_at = NULL, updated_at = now()
    FROM stale
    WHERE issues.id = stale.id
    RETURNING stale.id, stale.company_id, stale.checkout_run_id, stale.execution_run_id
    """
)


async def clear_execution(tx: Tx, issue_id: str, run_id: str, *, with_checkout: bool) -> Row | None:
    """Clear the issue's execution lock while ``run_id`` holds it (and its checkout too,
    with ``with_checkout``, when the same run holds it); the row after, or None when
    the run did not hold the lock."""
    return await tx.fetchrow(
        _CLEAR_EXECUTION, {"id": issue_id, "run": run_id, "with_checkout": with_checkout}
    )


async def take_execution(tx: Tx, issue_id: str, run_id: str, name_key: str) -> Row | None:
    """Give the free execution lock of the issue to ``run_id`` of the agent ``name_key``;
    the row after, or None when the lock was not free."""
    return await tx.fetchrow(_TAKE_EXECUTION, {"id": issue_id, "run": run_id, "name": name_key})


async def lock_issues_held_by(tx: Tx, run_id: str) -> list[Row]:
    """The issues whose checkout or execution lock ``run_id`` holds, locked, by id
    (``id``, ``company_id``, ``checkout_run_id``, ``execution_run_id``)."""
    return await tx.fetch(_LOCK_HELD_BY, {"r": run_id})


async def try_sweep_lock(tx: Tx, key: int) -> bool:
    """Whether this transaction took the advisory lock ``key`` (held until it ends)."""
    return bool(await tx.fetchval(_TRY_SWEEP_LOCK, {"k": key}))


async def sweep_stale_locks(tx: Tx, batch: int) -> list[Row]:
    """Clear the locks of up to ``batch`` issues no live run holds (skipping rows other
    transactions hold); the issues' ids, companies and previous lock runs."""
    return await tx.fetch(_SWEEP, {"batch": batch})
