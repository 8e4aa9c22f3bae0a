"""The enum values commands accept, in the short form tables print (``in_progress``),
as Python enums so Typer validates them and completes them in the shell. Each becomes
the API's value by its type prefix (``ISSUE_STATUS_IN_PROGRESS``)."""

from __future__ import annotations

from enum import Enum, StrEnum
from typing import Any

from paperclip_cli.output import enum_prefix


class IssueStatus(StrEnum):
    """``paperclip.issues.v1.IssueStatus``."""

    backlog = "backlog"
    todo = "todo"
    in_progress = "in_progress"
    in_review = "in_review"
    blocked = "blocked"
    done = "done"
    cancelled = "cancelled"


class IssuePriority(StrEnum):
    """``paperclip.issues.v1.IssuePriority``."""

    critical = "critical"
    high = "high"
    medium = "medium"
    low = "low"


class RunStatus(StrEnum):
    """``paperclip.runs.v1.RunStatus``."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    timed_out = "timed_out"


class WakeSource(StrEnum):
    """``paperclip.runs.v1.WakeSource``."""

    on_demand = "on_demand"
    assignment = "assignment"
    timer = "timer"
    automation = "automation"


class WorkspaceStatus(StrEnum):
    """``paperclip.workspaces.v1.WorkspaceStatus``."""

    active = "active"
    idle = "idle"
    in_review = "in_review"
    archived = "archived"
    cleanup_failed = "cleanup_failed"


class Role(StrEnum):
    """``paperclip.gateway.v1.Role``."""

    admin = "admin"
    member = "member"
    viewer = "viewer"


def proto_value(enum_type: Any, choice: Enum) -> Any:
    """The API's number for ``choice`` in the generated ``enum_type``:
    ``proto_value(issues_pb2.IssueStatus, IssueStatus.todo)``."""
    return enum_type.Value(enum_prefix(enum_type.DESCRIPTOR.name) + str(choice.value).upper())


__all__ = [
    "IssuePriority",
    "IssueStatus",
    "Role",
    "RunStatus",
    "WakeSource",
    "WorkspaceStatus",
    "proto_value",
]
