"""A status move made by a rule rather than by an UpdateIssue request (a comment that
reopens, an escalation, a reopen by the run service): the stamps of the new status, one
``issue.updated`` audit row and one ``issue.status_changed`` outbox event, together."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from common.actor import Actor
from common.audit import record_activity
from common.protoconv import text_or_none
from common.sql import Row, Tx
from issue_service import store
from issue_service.events import EventType, emit
from issue_service.model import Status
from issue_service.status_rules import status_stamps


async def move_status(
    tx: Tx,
    actor: Actor,
    row: Row,
    target: Status,
    *,
    details: Mapping[str, Any],
    event_payload: Mapping[str, Any] | None = None,
) -> Row:
    """Move the locked issue ``row`` to ``target``; the row afterwards.

    ``details`` go into the audit row next to the new status, the identifier and the
    previous status; ``event_payload`` (if given) into the outbox event next to the
    from/to statuses (no event without it)."""
    issue, company, previous = str(row["id"]), str(row["company_id"]), row["status"]
    updated = await store.update_issue_row(
        tx, issue, status_stamps(target, started_at=row["started_at"], now=datetime.now(UTC))
    )
    record_activity(
        tx,
        actor=actor,
        company_id=company,
        action="issue.updated",
        entity_type="issue",
        entity_id=issue,
        details={
            "status": target.value,
            **details,
            "identifier": row["identifier"],
            "_previous": {"status": previous},
        },
    )
    if event_payload is not None:
        emit(
            tx,
            actor=actor,
            company_id=company,
            issue_id=issue,
            type=EventType.STATUS_CHANGED,
            target_agent_id=text_or_none(updated["assignee_agent_id"]),
            payload={"from": previous, "to": target.value, **event_payload},
        )
    return updated
