"""Notices on an issue by the system actor: a comment and its audit row, nothing else.

The other services explain what they did to an issue's work this way (the run service's
wake-loop breaker, say). Such a comment moves no status and emits no outbox event, so it
wakes nobody; its idempotency key makes a repeated call add nothing.
"""

from __future__ import annotations

from common.actor import SYSTEM_ACTOR, Actor
from common.audit import record_activity
from common.authz import require_service
from common.db import Database
from common.errors import NotFound
from common.validation import MAX_BODY, parse_uuid, require_text
from issue_service import store
from issue_service.comments import comment_to_proto, insert_comment
from paperclip.issues.v1 import issues_pb2

MAX_KEY = 200
MAX_SOURCE = 100


async def add_system_comment(
    db: Database, actor: Actor, *, issue_id: str, body: str, idempotency_key: str, source: str
) -> issues_pb2.Comment | None:
    """The comment added, or None when ``idempotency_key`` was used before."""
    require_service(actor)
    issue = parse_uuid("issue_id", issue_id) or ""
    text_body = require_text("body", body, max_length=MAX_BODY)
    key = require_text("idempotency_key", idempotency_key, max_length=MAX_KEY)
    origin = require_text("source", source, max_length=MAX_SOURCE, required=False) or "system"
    async with db.unit_of_work() as tx:
        row = await store.lock_issue(tx, issue)
        if row is None:
            raise NotFound("issue not found", reason="ISSUE_NOT_FOUND", metadata={"id": issue})
        comment = await insert_comment(tx, SYSTEM_ACTOR, row, text_body, key=key)
        if comment is None:
            return None
        record_activity(
            tx,
            actor=SYSTEM_ACTOR,
            company_id=str(row["company_id"]),
            action="issue.comment_added",
            entity_type="issue",
            entity_id=issue,
            details={
                "commentId": str(comment["id"]),
                "bodySnippet": text_body[:120],
                "source": origin,
            },
        )
        return comment_to_proto(comment)
