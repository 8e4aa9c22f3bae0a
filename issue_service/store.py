"""SQL for the issue service's issue rows, their blockers and the outbox, and the
``Issue`` message of a row; reads of other services' rows come from ``foreign_reads``."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from common.errors import NotFound, invalid
from common.protoconv import text as opt
from common.sql import Batch, Row, Tx, sql
from issue_service.foreign_reads import (
    CHECKOUT_AGENT_COLUMNS,
    CHECKOUT_AGENT_JOIN,
    EXECUTION_RUN_STATUS,
    AgentInfo,
)
from issue_service.model import Priority, Status
from paperclip.issues.v1 import issues_pb2

ISSUE_COLUMNS = """
    issues.id, issues.company_id, issues.issue_number, issues.identifier, issues.title,
    issues.description, issues.status, issues.priority, issues.assignee_agent_id,
    issues.assignee_user_id, issues.checkout_run_id, issues.execution_run_id,
    issues.execution_agent_name_key, issues.execution_locked_at, issues.parent_issue_id,
    issues.created_by_agent_id, issues.created_by_user_id, issues.started_at,
    issues.completed_at, issues.cancelled_at, issues.created_at, issues.updated_at,
    ARRAY(SELECT b.blocker_issue_id FROM issues.issue_blockers b
          WHERE b.issue_id = issues.id ORDER BY b.created_at, b.blocker_issue_id) AS blocked_by
"""

IDENTIFIER_RE = re.compile(r"^([A-Za-z]{2,10})-(\d{1,18})$")

_SELECT_BY_ID = sql(f"SELECT {ISSUE_COLUMNS} FROM issues.issues WHERE id = :id")
#: ``lock_issue``'s statement, as text for statements that start with it.
LOCK_BY_ID = (
    f"SELECT {ISSUE_COLUMNS}, {EXECUTION_RUN_STATUS} FROM issues.issues "
    "WHERE id = :id FOR UPDATE OF issues"
)
_LOCK_BY_ID = sql(LOCK_BY_ID)
_SELECT_BY_IDENTIFIER = sql(
    f"SELECT {ISSUE_COLUMNS} FROM issues.issues WHERE identifier = :identifier"
)
#: The issue locked as ``lock_issue`` does, with the agent it is checked out for
#: (``agent_*``, NULL when there is no such agent) and its unresolved blockers.
LOCK_FOR_CHECKOUT = f"""
    SELECT {ISSUE_COLUMNS}, {EXECUTION_RUN_STATUS},
        {CHECKOUT_AGENT_COLUMNS}
        ARRAY(SELECT b.blocker_issue_id FROM issues.issue_blockers b
              JOIN issues.issues blocker ON blocker.id = b.blocker_issue_id
              WHERE b.issue_id = issues.id AND blocker.status <> 'done'
              ORDER BY b.blocker_issue_id) AS open_blockers
    FROM issues.issues {CHECKOUT_AGENT_JOIN}
    WHERE issues.id = :id
    FOR UPDATE OF issues
"""
_OPEN_BLOCKERS = sql(
    """
    SELECT b.blocker_issue_id FROM issues.issue_blockers b
    JOIN issues.issues blocker ON blocker.id = b.blocker_issue_id
    WHERE b.issue_id = :id AND blocker.status <> 'done'
    ORDER BY b.blocker_issue_id
    """
)


_CREATE = sql(
    f"""
    WITH counter AS (
        UPDATE issues.companies SET issue_counter = issue_counter + 1, updated_at = now()
        WHERE id = :company RETURNING issue_counter, issue_prefix
    )
    INSERT INTO issues.issues AS issues
        (company_id, issue_number, identifier, title, description, status, priority,
         assignee_agent_id, assignee_user_id, parent_issue_id, created_by_agent_id,
         created_by_user_id, create_request_id, started_at, completed_at, cancelled_at)
    SELECT :company, counter.issue_counter, counter.issue_prefix || '-' || counter.issue_counter,
           :title, :description, :status, :priority, :assignee_agent, :assignee_user, :parent,
           :by_agent, :by_user, :request_id, :started_at, :completed_at, :cancelled_at
    FROM counter
    ON CONFLICT (company_id, create_request_id) DO NOTHING
    RETURNING {ISSUE_COLUMNS}
    """
)
_BY_REQUEST = sql(
    f"SELECT {ISSUE_COLUMNS} FROM issues.issues "
    "WHERE company_id = :company AND create_request_id = :request_id"
)
_PAGE = sql(
    f"""
        SELECT {ISSUE_COLUMNS} FROM issues.issues
        WHERE company_id = :company AND issue_number > :after
          AND (CAST(:statuses AS text[]) IS NULL OR status = ANY(CAST(:statuses AS text[])))
          AND (CAST(:assignee AS uuid) IS NULL OR assignee_agent_id = CAST(:assignee AS uuid))
        ORDER BY issue_number LIMIT :limit
        """
)
_DELETE_BLOCKERS = sql(
    "DELETE FROM issues.issue_blockers WHERE issue_id = :id "
    "AND NOT (blocker_issue_id = ANY(CAST(:keep AS uuid[])))"
)
_INSERT_BLOCKERS = sql(
    "INSERT INTO issues.issue_blockers (issue_id, blocker_issue_id) "
    "SELECT :id, unnest(CAST(:ids AS uuid[])) ON CONFLICT DO NOTHING"
)
_EXISTING_IN_COMPANY = sql(
    "SELECT id FROM issues.issues WHERE company_id = :c AND id = ANY(CAST(:ids AS uuid[]))"
)


#: The outbox: rows deferred by ``events.emit``, inserted at the end of the unit of work.
ISSUE_EVENTS = Batch(
    "issues.issue_events",
    (
        ("company_id", "uuid"),
        ("issue_id", "uuid"),
        ("type", "text"),
        ("actor_type", "text"),
        ("actor_id", "text"),
        ("actor_agent_id", "uuid"),
        ("actor_run_id", "uuid"),
        ("target_agent_id", "uuid"),
        ("payload", "jsonb"),
    ),
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """``common.protoconv.timestamp`` by integer arithmetic. An issue carries up to six
    timestamps and is built on every call that answers one; ``FromDatetime`` (pure
    Python) cost several times this."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def issue_to_proto(row: Row) -> issues_pb2.Issue:
    """The ``Issue`` message of one issue row."""
    return issues_pb2.Issue(
        id=str(row["id"]),
        company_id=str(row["company_id"]),
        identifier=row["identifier"],
        issue_number=row["issue_number"],
        title=row["title"],
        description=row["description"],
        status=Status(row["status"]).to_proto(),
        priority=Priority(row["priority"]).to_proto(),
        assignee_agent_id=opt(row["assignee_agent_id"]),
        assignee_user_id=opt(row["assignee_user_id"]),
        checkout_run_id=opt(row["checkout_run_id"]),
        execution_run_id=opt(row["execution_run_id"]),
        execution_locked_at=timestamp(row["execution_locked_at"]),
        started_at=timestamp(row["started_at"]),
        completed_at=timestamp(row["completed_at"]),
        cancelled_at=timestamp(row["cancelled_at"]),
        created_at=timestamp(row["created_at"]),
        updated_at=timestamp(row["updated_at"]),
        parent_issue_id=opt(row["parent_issue_id"]),
        blocked_by_issue_ids=[str(b) for b in row["blocked_by"] or ()],
        created_by_agent_id=opt(row["created_by_agent_id"]),
        created_by_user_id=opt(row["created_by_user_id"]),
        execution_agent_name_key=opt(row["execution_agent_name_key"]),
    )


def parse_issue_ref(field: str, value: str) -> tuple[str, str]:
    """('id', uuid) or ('identifier', 'PAP-12') for a reference to an issue."""
    if not value:
        raise invalid(field, "is required")
    match = IDENTIFIER_RE.match(value)
    if match:
        return ("identifier", f"{match.group(1).upper()}-{int(match.group(2))}")
    try:
        return ("id", str(uuid.UUID(value)))
    except ValueError as exc:
        raise invalid(field, "must be an issue UUID or an identifier like PAP-12") from exc


async def find_issue(tx: Tx, ref: tuple[str, str]) -> Row:
    """The issue ``ref`` names; NOT_FOUND when there is none."""
    kind, value = ref
    if kind == "id":
        row = await tx.fetchrow(_SELECT_BY_ID, {"id": value})
    else:
        row = await tx.fetchrow(_SELECT_BY_IDENTIFIER, {"identifier": value})
    if row is None:
        raise NotFound("issue not found", reason="ISSUE_NOT_FOUND", metadata={"issue": value})
    return row


async def insert_issue(tx: Tx, values: Mapping[str, Any]) -> Row | None:
    """Insert an issue numbered next in its company: ``values`` are the parameters of
    ``_CREATE`` (``company``, ``title``, ``description``, ``status``, ``priority``,
    ``assignee_agent``, ``assignee_user``, ``parent``, ``by_agent``, ``by_user``,
    ``request_id`` and the ``*_at`` stamps). None: no such company, or the company's
    issue with this request id exists."""
    return await tx.fetchrow(_CREATE, values)


async def issue_by_request(tx: Tx, company_id: str, request_id: str) -> Row | None:
    """The company's issue created with ``request_id``, if any."""
    return await tx.fetchrow(_BY_REQUEST, {"company": company_id, "request_id": request_id})


async def issues_page(
    tx: Tx,
    *,
    company_id: str,
    after: int,
    statuses: Sequence[str] | None,
    assignee_agent_id: str | None,
    limit: int,
) -> list[Row]:
    """Up to ``limit`` of the company's issues numbered after ``after``, in number order,
    optionally only in ``statuses`` and assigned to ``assignee_agent_id``."""
    return await tx.fetch(
        _PAGE,
        {
            "company": company_id,
            "after": after,
            "statuses": statuses,
            "assignee": assignee_agent_id,
            "limit": limit,
        },
    )


async def lock_issue(tx: Tx, issue_id: str) -> Row | None:
    """The issue row, locked FOR UPDATE until the transaction ends (None if missing),
    with the status of its execution run as ``execution_run_status``."""
    return await tx.fetchrow(_LOCK_BY_ID, {"id": issue_id})


def agent_of_checkout_row(row: Row, agent_id: str) -> AgentInfo | None:
    """The agent read with the issue by ``LOCK_FOR_CHECKOUT`` (None: no such agent)."""
    if row["agent_company_id"] is None:
        return None
    return AgentInfo(
        agent_id, str(row["agent_company_id"]), row["agent_status"], row["agent_name_key"]
    )


async def open_blockers(tx: Tx, issue_id: str) -> list[str]:
    """Blockers of the issue that are not done (cancelled blockers still block)."""
    return [str(r[0]) for r in await tx.fetch(_OPEN_BLOCKERS, {"id": issue_id})]


async def update_issue_row(tx: Tx, issue_id: str, values: dict[str, Any]) -> Row:
    """Apply ``values`` (column -> value) to a locked issue; bumps ``updated_at``."""
    columns = sorted(values)
    assignments = "".join(f"{column} = :v_{column}, " for column in columns)
    query = sql(
        f"UPDATE issues.issues SET {assignments}updated_at = now() "
        f"WHERE id = :id RETURNING {ISSUE_COLUMNS}"
    )
    params = {f"v_{column}": values[column] for column in columns}
    params["id"] = issue_id
    row = await tx.fetchrow(query, params)
    assert row is not None, "update_issue_row needs a locked, existing issue"
    return row


async def replace_blockers(tx: Tx, issue_id: str, blocker_ids: Sequence[str]) -> None:
    """Make ``blocker_ids`` the exact set of blockers of the issue."""
    await tx.execute(_DELETE_BLOCKERS, {"id": issue_id, "keep": list(blocker_ids)})
    if blocker_ids:
        await tx.execute(_INSERT_BLOCKERS, {"id": issue_id, "ids": list(blocker_ids)})


async def missing_or_foreign_issues(tx: Tx, company_id: str, issue_ids: Sequence[str]) -> list[str]:
    """Those of ``issue_ids`` that do not exist in the company."""
    if not issue_ids:
        return []
    rows = await tx.fetch(_EXISTING_IN_COMPANY, {"c": company_id, "ids": list(issue_ids)})
    found = {str(r[0]) for r in rows}
    return [i for i in issue_ids if i not in found]
