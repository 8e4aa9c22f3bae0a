"""SQL of ``workspaces.workspace_operations``, the recorded commands of workspaces
(``recorder`` writes them, ``operations`` reads them), in the unit of work of the caller."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from common.sql import Row, Tx, sql

_SUMMARY = """
    id, company_id, workspace_id, parent_operation_id, run_id, issue_id, actor_type,
    actor_id, phase, command, cwd, status, exit_code, stdout_excerpt, stderr_excerpt,
    stdout_bytes, stderr_bytes, stdout_sha256, stderr_sha256, metadata, started_at,
    finished_at
"""
_GET = sql(f"SELECT {_SUMMARY}, stdout, stderr FROM workspaces.workspace_operations WHERE id = :id")
_LIST = sql(
    f"""
    SELECT {_SUMMARY} FROM workspaces.workspace_operations
     WHERE workspace_id = :workspace_id
       AND (CAST(:after_t AS timestamptz) IS NULL
            OR (started_at, id) < (CAST(:after_t AS timestamptz), CAST(:after_id AS uuid)))
     ORDER BY started_at DESC, id DESC
     LIMIT :limit
    """
)
_INSERT = sql(
    """
    INSERT INTO workspaces.workspace_operations (
        company_id, workspace_id, parent_operation_id, run_id, issue_id, actor_type,
        actor_id, phase, command, cwd, host, metadata
    ) VALUES (
        :company_id, :workspace_id, :parent_id, :run_id, :issue_id, :actor_type,
        :actor_id, :phase, :command, :cwd, :host, :metadata::jsonb
    )
    RETURNING id
    """
)
_FINISH = sql(
    """
    UPDATE workspaces.workspace_operations
       SET status = :status, exit_code = :exit_code,
           stdout = :stdout, stderr = :stderr,
           stdout_excerpt = :stdout_excerpt, stderr_excerpt = :stderr_excerpt,
           stdout_bytes = :stdout_bytes, stderr_bytes = :stderr_bytes,
           stdout_sha256 = :stdout_sha256, stderr_sha256 = :stderr_sha256,
           metadata = metadata || :metadata::jsonb, finished_at = clock_timestamp()
     WHERE id = :id
    """
)
_BACKFILL = sql(
    """
    UPDATE workspaces.workspace_operations SET workspace_id = :workspace_id
     WHERE id = ANY(:ids::uuid[]) AND workspace_id IS NULL
    """
)


async def load_operation(tx: Tx, operation_id: str) -> Row | None:
    """An operation row with its output."""
    return await tx.fetchrow(_GET, {"id": operation_id})


async def list_operations(
    tx: Tx,
    workspace_id: str,
    *,
    after_t: datetime | None,
    after_id: str | None,
    limit: int,
) -> list[Row]:
    """Up to ``limit`` operations of a workspace (without output), newest first, after
    the keyset cursor ``(after_t, after_id)`` when one is given."""
    return await tx.fetch(
        _LIST,
        {"workspace_id": workspace_id, "after_t": after_t, "after_id": after_id, "limit": limit},
    )


async def insert_operation(tx: Tx, values: Mapping[str, Any]) -> str:
    """A new ``running`` operation row; its id. ``values``: company_id, workspace_id,
    parent_id, run_id, issue_id, actor_type, actor_id, phase, command, cwd, host and
    metadata (JSON text)."""
    return str(await tx.fetchval(_INSERT, values))


async def finish_operation(tx: Tx, values: Mapping[str, Any]) -> None:
    """Write an operation's end: id, status, exit_code, stdout, stderr, their excerpts,
    byte counts and digests, and metadata (JSON text, merged into the row's)."""
    await tx.execute(_FINISH, values)


async def set_workspace_of(tx: Tx, workspace_id: str, operation_ids: Sequence[str]) -> None:
    """Set ``workspace_id`` on those of the operations that have none yet."""
    await tx.execute(_BACKFILL, {"workspace_id": workspace_id, "ids": list(operation_ids)})
