"""Issue-domain values and their protobuf forms."""

from __future__ import annotations

from enum import StrEnum

from paperclip.issues.v1 import issues_pb2


class Status(StrEnum):
    BACKLOG = "backlog"
    TODO = "todo"
    IN_PROGRESS = "in_progress"
    IN_REVIEW = "in_review"
    BLOCKED = "blocked"
    DONE = "done"
    CANCELLED = "cancelled"

    def to_proto(self) -> issues_pb2.IssueStatus.ValueType:
        return _STATUS_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> Status:
        return _PROTO_TO_STATUS[value]  # type: ignore[index]


class Priority(StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"

    def to_proto(self) -> issues_pb2.IssuePriority.ValueType:
        return _PRIORITY_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> Priority:
        return _PROTO_TO_PRIORITY[value]  # type: ignore[index]


_STATUS_TO_PROTO: dict[Status, issues_pb2.IssueStatus.ValueType] = {
    Status.BACKLOG: issues_pb2.ISSUE_STATUS_BACKLOG,
    Status.TODO: issues_pb2.ISSUE_STATUS_TODO,
    Status.IN_PROGRESS: issues_pb2.ISSUE_STATUS_IN_PROGRESS,
    Status.IN_REVIEW: issues_pb2.ISSUE_STATUS_IN_REVIEW,
    Status.BLOCKED: issues_pb2.ISSUE_STATUS_BLOCKED,
    Status.DONE: issues_pb2.ISSUE_STATUS_DONE,
    Status.CANCELLED: issues_pb2.ISSUE_STATUS_CANCELLED,
}
_PROTO_TO_STATUS = {v: k for k, v in _STATUS_TO_PROTO.items()}
STATUS_PROTO_VALUES: tuple[int, ...] = tuple(_PROTO_TO_STATUS)

_PRIORITY_TO_PROTO: dict[Priority, issues_pb2.IssuePriority.ValueType] = {
    Priority.CRITICAL: issues_pb2.ISSUE_PRIORITY_CRITICAL,
    Priority.HIGH: issues_pb2.ISSUE_PRIORITY_HIGH,
    Priority.MEDIUM: issues_pb2.ISSUE_PRIORITY_MEDIUM,
    Priority.LOW: issues_pb2.ISSUE_PRIORITY_LOW,
}
_PROTO_TO_PRIORITY = {v: k for k, v in _PRIORITY_TO_PROTO.items()}
PRIORITY_PROTO_VALUES: tuple[int, ...] = tuple(_PROTO_TO_PRIORITY)

#: Run statuses after which a run holds nothing (the issue service's view).
TERMINAL_RUN_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timed_out"})


def run_is_stale(status: str | None) -> bool:
    """A lock held by a run in this status (None: the run row is missing) is stale."""
    return status is None or status in TERMINAL_RUN_STATUSES
