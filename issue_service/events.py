"""The transactional outbox: what an issue change means for other services.

Rows go to ``issues.issue_events`` in the same transaction as the change; a statement
trigger NOTIFYs ``paperclip_issue_events`` on commit. The run service turns them into
wakes, keyed by the event id, and never wakes an agent for its own run's events.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from common.actor import Actor


class EventType(StrEnum):
    CREATED = "issue.created"
    ASSIGNED = "issue.assigned"
    STATUS_CHANGED = "issue.status_changed"
    COMMENTED = "issue.commented"
    MENTIONED = "issue.mentioned"
    REOPENED = "issue.reopened"
    CHECKED_OUT = "issue.checked_out"
    RELEASED = "issue.released"
    FORCE_RELEASED = "issue.force_released"
    INTERRUPT_REQUESTED = "issue.interrupt_requested"


_INSERT = text(
    """
    INSERT INTO issues.issue_events
        (company_id, issue_id, type, actor_type, actor_id, actor_agent_id, actor_run_id,
         target_agent_id, payload)
    VALUES (:company_id, :issue_id, :type, :actor_type, :actor_id, :actor_agent_id,
            :actor_run_id, :target_agent_id, CAST(:payload AS jsonb))
    """
)


async def emit(
    conn: AsyncConnection,
    *,
    actor: Actor,
    company_id: str,
    issue_id: str,
    type: EventType,
    target_agent_id: str | None = None,
    payload: Mapping[str, Any] | None = None,
) -> None:
    """Append one outbox event, attributed to ``actor`` and its run."""
    actor_type, actor_id, agent_id, run_id = actor.audit_identity()
    await conn.execute(
        _INSERT,
        {
            "company_id": company_id,
            "issue_id": issue_id,
            "type": type.value,
            "actor_type": actor_type,
            "actor_id": actor_id,
            "actor_agent_id": agent_id,
            "actor_run_id": run_id,
            "target_agent_id": target_agent_id,
            "payload": json.dumps(dict(payload or {}), default=str),
        },
    )
