"""Reading the audit trail of a company."""

from __future__ import annotations

from common.actor import Actor
from common.authz import require_company_access
from common.db import Database
from common.errors import invalid
from common.pagination import parse_page
from common.protoconv import struct, timestamp
from common.protoconv import text as opt
from common.sql import Row
from common.validation import parse_uuid, require_text
from issue_service import activity_store
from paperclip.issues.v1 import issues_pb2


def entry_to_proto(row: Row) -> issues_pb2.ActivityEntry:
    return issues_pb2.ActivityEntry(
        id=str(row["id"]),
        company_id=str(row["company_id"]),
        actor_type=row["actor_type"],
        actor_id=row["actor_id"],
        agent_id=opt(row["agent_id"]),
        run_id=opt(row["run_id"]),
        action=row["action"],
        entity_type=row["entity_type"],
        entity_id=row["entity_id"],
        details=struct(row["details"]),
        created_at=timestamp(row["created_at"]),
    )


async def list_activity(
    db: Database,
    actor: Actor,
    *,
    company_id: str,
    entity_type: str,
    entity_id: str,
    action: str,
    page_size: int,
    page_token: str,
) -> tuple[list[issues_pb2.ActivityEntry], str]:
    """A page of the company's audit rows, newest first, optionally filtered."""
    company = parse_uuid("company_id", company_id)
    assert company
    filters = {
        "entity_type": require_text("entity_type", entity_type, max_length=100, required=False),
        "entity_id": require_text("entity_id", entity_id, max_length=200, required=False),
        "action": require_text("action", action, max_length=200, required=False),
    }
    if filters["entity_id"] and not filters["entity_type"]:
        raise invalid("entity_type", "is required with entity_id")
    page = parse_page(page_size, page_token, company=company, **filters)
    require_company_access(actor, company, write=False)
    before = page.cursor_int("id") if page.cursor else None
    async with db.unit_of_work() as tx:
        rows = await activity_store.activity_page(
            tx, company, **filters, before=before, limit=page.fetch_limit
        )
    shown, token = page.finish(rows, lambda row: {"id": row["id"]})
    return [entry_to_proto(r) for r in shown], token
