"""The transactional outbox: what an issue change means for other services.

Rows go to ``issues.issue_events`` in the same transaction as the change (deferred to
the end of the unit of work); a statement trigger NOTIFYs ``paperclip_issue_events`` on
commit. The run service turns them into wakes, keyed by the event id, and never wakes
an agent for its own run's events.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from common.actor import Actor
from common.sql import Tx
from issue_service.store import ISSUE_EVENTS


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


def emit(
    tx: Tx,
    *,
    actor: Actor,
    company_id: str,
    issue_id: str,
    type: EventType,
    target_agent_id: str | None = None,
    payload: Mapping[str, Any] | None = None,
) -> None:
    """Append one outbox event, attributed to ``actor`` and its run (written at commit)."""
    actor_type, actor_id, agent_id, run_id = actor.audit_identity()
    tx.defer(
        ISSUE_EVENTS,
        (
            company_id,
            issue_id,
            type.value,
            actor_type,
            actor_id,
            agent_id,
            run_id,
            target_agent_id,
            json.dumps(dict(payload or {}), default=str),
        ),
    )
