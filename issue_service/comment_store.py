"""SQL for the comments of issues (``issues.issue_comments``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from common.sql import Row, Tx, sql

COMMENT_COLUMNS = (
    "id, company_id, issue_id, body, author_type, author_agent_id, author_user_id, "
    "created_by_run_id, created_at"
)
_INSERT = sql(
    f"""
    INSERT INTO issues.issue_comments
        (company_id, issue_id, body, author_type, author_agent_id, author_user_id,
         created_by_run_id, idempotency_key)
    VALUES (:company, :issue, :body, :author_type, :agent, :user, :run, :key)
    ON CONFLICT (issue_id, idempotency_key) DO NOTHING
    RETURNING {COMMENT_COLUMNS}
    """
)
_TOUCH_ISSUE = sql("UPDATE issues.issues SET updated_at = now() WHERE id = :id")
_PAGE = sql(
    f"""
            SELECT {COMMENT_COLUMNS} FROM issues.issue_comments
            WHERE issue_id = :issue
              AND (CAST(:after_ts AS timestamptz) IS NULL
                   OR (created_at, id) > (CAST(:after_ts AS timestamptz), CAST(:after_id AS uuid)))
            ORDER BY created_at, id LIMIT :limit
            """
)


async def insert_comment(tx: Tx, values: dict[str, Any]) -> Row | None:
    """Insert a comment (``values``: ``company``, ``issue``, ``body``, ``author_type``,
    ``agent``, ``user``, ``run``, ``key``) and touch its issue's ``updated_at``; None
    when the issue has a comment with this idempotency key."""
    inserted = await tx.fetchrow(_INSERT, values)
    if inserted is not None:
        await tx.execute(_TOUCH_ISSUE, {"id": values["issue"]})
    return inserted


async def comments_page(
    tx: Tx, issue_id: str, *, after_ts: datetime | None, after_id: str | None, limit: int
) -> list[Row]:
    """Up to ``limit`` of the issue's comments after the cursor, oldest first."""
    return await tx.fetch(
        _PAGE, {"issue": issue_id, "after_ts": after_ts, "after_id": after_id, "limit": limit}
    )
