"""SQL for the companies (``issues.companies``), the tenants of the issue service."""

from __future__ import annotations

from datetime import datetime

from common.sql import Row, Tx, sql

COLUMNS = "id, name, issue_prefix, status, created_at, updated_at"

_INSERT = sql(
    "INSERT INTO issues.companies (name, issue_prefix) "
    f"VALUES (:name, :prefix) ON CONFLICT (issue_prefix) DO NOTHING RETURNING {COLUMNS}"
)
_BY_ID = sql(f"SELECT {COLUMNS} FROM issues.companies WHERE id = :id")
_PAGE = sql(
    f"""
            SELECT {COLUMNS} FROM issues.companies
            WHERE (CAST(:visible AS uuid[]) IS NULL OR id = ANY(CAST(:visible AS uuid[])))
              AND (CAST(:after_id AS uuid) IS NULL
                   OR (created_at, id) > (CAST(:after_ts AS timestamptz), CAST(:after_id AS uuid)))
            ORDER BY created_at, id LIMIT :limit
            """
)
_EXISTS = sql("SELECT 1 FROM issues.companies WHERE id = :id")


async def insert_company(tx: Tx, name: str, prefix: str) -> Row | None:
    """The new company; None when ``prefix`` is taken."""
    return await tx.fetchrow(_INSERT, {"name": name, "prefix": prefix})


async def company_by_id(tx: Tx, company_id: str) -> Row | None:
    return await tx.fetchrow(_BY_ID, {"id": company_id})


async def companies_page(
    tx: Tx,
    *,
    visible: list[str] | None,
    after_ts: datetime | None,
    after_id: str | None,
    limit: int,
) -> list[Row]:
    """Up to ``limit`` companies after the cursor (``after_ts``, ``after_id``) in creation
    order, only those in ``visible`` unless it is None."""
    return await tx.fetch(
        _PAGE,
        {"visible": visible, "after_id": after_id, "after_ts": after_ts, "limit": limit},
    )


async def company_exists(tx: Tx, company_id: str) -> bool:
    found = await tx.fetchval(_EXISTS, {"id": company_id})
    return found is not None
