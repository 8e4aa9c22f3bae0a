"""Companies: the tenants, each with its own issue identifier prefix."""

from __future__ import annotations

import re

from common.actor import Actor
from common.audit import record_activity
from common.authz import require_company_access, require_instance_admin
from common.db import Database
from common.errors import AlreadyExists, NotFound, invalid
from common.pagination import created_cursor, parse_page
from common.protoconv import timestamp
from common.sql import Row
from common.validation import MAX_NAME, parse_uuid, require_text
from issue_service import company_store
from paperclip.issues.v1 import issues_pb2

PREFIX_RE = re.compile(r"^[A-Z]{2,10}$")
_STATUS = {
    "active": issues_pb2.COMPANY_STATUS_ACTIVE,
    "paused": issues_pb2.COMPANY_STATUS_PAUSED,
    "archived": issues_pb2.COMPANY_STATUS_ARCHIVED,
}


def company_to_proto(row: Row) -> issues_pb2.Company:
    return issues_pb2.Company(
        id=str(row["id"]),
        name=row["name"],
        issue_prefix=row["issue_prefix"],
        status=_STATUS[row["status"]],
        created_at=timestamp(row["created_at"]),
        updated_at=timestamp(row["updated_at"]),
    )


def derive_prefix(name: str) -> str:
    """A default prefix from the company name: its first letters, upper-cased."""
    letters = "".join(c for c in name.upper() if "A" <= c <= "Z")
    return letters[:3] if len(letters) >= 2 else "PAP"


async def create_company(
    db: Database, actor: Actor, *, name: str, issue_prefix: str
) -> issues_pb2.Company:
    """Create a company (instance admins only)."""
    require_instance_admin(actor)
    clean_name = require_text("name", name, max_length=MAX_NAME)
    prefix = issue_prefix.strip().upper() or derive_prefix(clean_name)
    if not PREFIX_RE.match(prefix):
        raise invalid("issue_prefix", "must be 2 to 10 letters")
    async with db.unit_of_work() as tx:
        row = await company_store.insert_company(tx, clean_name, prefix)
        if row is None:
            raise AlreadyExists(
                f"issue prefix {prefix} is taken",
                reason="ISSUE_PREFIX_TAKEN",
                metadata={"issue_prefix": prefix},
            )
        record_activity(
            tx,
            actor=actor,
            company_id=str(row["id"]),
            action="company.created",
            entity_type="company",
            entity_id=str(row["id"]),
            details={"name": clean_name, "issuePrefix": prefix},
        )
        return company_to_proto(row)


async def get_company(db: Database, actor: Actor, *, company_id: str) -> issues_pb2.Company:
    company = parse_uuid("company_id", company_id)
    assert company
    require_company_access(actor, company, write=False)
    async with db.unit_of_work() as tx:
        row = await company_store.company_by_id(tx, company)
    if row is None:
        raise NotFound("company not found", reason="COMPANY_NOT_FOUND")
    return company_to_proto(row)


async def list_companies(
    db: Database, actor: Actor, *, page_size: int, page_token: str
) -> tuple[list[issues_pb2.Company], str]:
    """The companies the caller can see, oldest first."""
    page = parse_page(page_size, page_token)
    visible: list[str] | None
    if actor.is_service or actor.is_instance_admin:
        visible = None
    elif actor.is_agent:
        visible = [actor.company_id or ""]
    else:
        visible = sorted(actor.memberships)
    after_ts = page.cursor_time("t") if page.cursor else None
    after_id = page.cursor_uuid("i") if page.cursor else None
    async with db.unit_of_work() as tx:
        rows = await company_store.companies_page(
            tx, visible=visible, after_ts=after_ts, after_id=after_id, limit=page.fetch_limit
        )
    shown, token = page.finish(rows, created_cursor)
    return [company_to_proto(r) for r in shown], token
