"""The status state machine and the side effects of a status or assignee change."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from issue_service.model import Status

#: The documented transitions agents must follow; board users may make any.
AGENT_TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.BACKLOG: frozenset({Status.TODO, Status.CANCELLED}),
    Status.TODO: frozenset({Status.IN_PROGRESS, Status.BLOCKED, Status.CANCELLED}),
    Status.IN_PROGRESS: frozenset(
        {Status.IN_REVIEW, Status.BLOCKED, Status.DONE, Status.CANCELLED}
    ),
    Status.IN_REVIEW: frozenset({Status.IN_PROGRESS, Status.DONE, Status.CANCELLED}),
    Status.BLOCKED: frozenset({Status.TODO, Status.IN_PROGRESS, Status.CANCELLED}),
    Status.DONE: frozenset(),
    Status.CANCELLED: frozenset(),
}

LOCK_COLUMNS_CLEARED: dict[str, Any] = {
    "checkout_run_id": None,
    "execution_run_id": None,
    "execution_agent_name_key": None,
    "execution_locked_at": None,
}


def is_documented_transition(current: Status, target: Status) -> bool:
    """Whether ``current -> target`` is in the documented table (same status: yes)."""
    return current == target or target in AGENT_TRANSITIONS[current]


def status_stamps(target: Status, *, started_at: datetime | None, now: datetime) -> dict[str, Any]:
    """Column values a move to ``target`` sets: stamps, and cleared locks off in_progress."""
    values: dict[str, Any] = {"status": target.value}
    if target is Status.IN_PROGRESS:
        values["started_at"] = started_at or now
    if target is Status.DONE:
        values["completed_at"] = now
        values["cancelled_at"] = None
    elif target is Status.CANCELLED:
        values["cancelled_at"] = now
        values["completed_at"] = None
    else:
        values["completed_at"] = None
        values["cancelled_at"] = None
    if target is not Status.IN_PROGRESS:
        values.update(LOCK_COLUMNS_CLEARED)
    return values
