"""SQL for reading the audit trail (``audit.activity_log``) of a company."""

from __future__ import annotations

from common.sql import Row, Tx, sql

_PAGE = sql(
    """
            SELECT id, company_id, actor_type, actor_id, agent_id, run_id, action,
                   entity_type, entity_id, details, created_at
            FROM audit.activity_log
            WHERE company_id = :company
              AND (:entity_type = '' OR entity_type = :entity_type)
              AND (:entity_id = '' OR entity_id = :entity_id)
              AND (:action = '' OR action = :action)
              AND (CAST(:before AS bigint) IS NULL OR id < CAST(:before AS bigint))
            ORDER BY id DESC LIMIT :limit
            """
)


async def activity_page(
    tx: Tx,
    company_id: str,
    *,
    entity_type: str,
    entity_id: str,
    action: str,
    before: int | None,
    limit: int,
) -> list[Row]:
    """Up to ``limit`` of the company's audit rows below id ``before``, newest first;
    only those of ``entity_type``, ``entity_id`` and ``action`` when not empty."""
    return await tx.fetch(
        _PAGE,
        {
            "company": company_id,
            "entity_type": entity_type,
            "entity_id": entity_id,
            "action": action,
            "before": before,
            "limit": limit,
        },
    )
