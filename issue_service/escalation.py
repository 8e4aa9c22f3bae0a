"""Escalating a stranded issue: blocked, with one explanatory comment by the system."""

from __future__ import annotations

import hashlib

from common.actor import SYSTEM_ACTOR, Actor
from common.audit import record_activity
from common.authz import require_service
from common.db import Database
from common.errors import NotFound
from common.validation import MAX_BODY, parse_uuid, require_text
from issue_service import store
from issue_service.comments import comment_to_proto, insert_comment
from issue_service.model import Status
from issue_service.status_moves import move_status
from paperclip.issues.v1 import issues_pb2


async def escalate_stranded_issue(
    db: Database, actor: Actor, *, issue_id: str, body: str, idempotency_key: str
) -> tuple[issues_pb2.Issue, issues_pb2.Comment | None, bool]:
    """(issue, comment, escalated); a repeat with the same key changes nothing."""
    require_service(actor)
    issue = parse_uuid("issue_id", issue_id)
    text_body = require_text("body", body, max_length=MAX_BODY)
    key = require_text("idempotency_key", idempotency_key, max_length=200, required=False)
    assert issue
    key = key or "escalate:" + hashlib.sha256(f"{issue}\n{text_body}".encode()).hexdigest()[:32]
    async with db.unit_of_work() as tx:
        row = await store.lock_issue(tx, issue)
        if row is None:
            raise NotFound("issue not found", reason="ISSUE_NOT_FOUND")
        comment = await insert_comment(tx, SYSTEM_ACTOR, row, text_body, key=key)
        if comment is None:
            return store.issue_to_proto(row), None, False
        company = str(row["company_id"])
        previous = row["status"]
        if previous != Status.BLOCKED:
            row = await move_status(
                tx,
                SYSTEM_ACTOR,
                row,
                Status.BLOCKED,
                details={"source": "stranded_issue"},
                event_payload={"source": "stranded_issue"},
            )
        record_activity(
            tx,
            actor=SYSTEM_ACTOR,
            company_id=company,
            action="issue.comment_added",
            entity_type="issue",
            entity_id=issue,
            details={
                "commentId": str(comment["id"]),
                "bodySnippet": text_body[:120],
                "source": "stranded_issue",
            },
        )
        return store.issue_to_proto(row), comment_to_proto(comment), True
