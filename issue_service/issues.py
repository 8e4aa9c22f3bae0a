"""Creating, reading, listing and updating issues."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from common.actor import Actor
from common.audit import record_activity
from common.authz import require_agent_run, require_company_access
from common.db import Database
from common.errors import Aborted, FailedPrecondition, NotFound, PaperclipError, invalid
from common.pagination import parse_page
from common.protoconv import text_or_none
from common.sql import Row, Tx
from common.validation import (
    MAX_BODY,
    MAX_TITLE,
    parse_uuid,
    parse_uuids,
    require_enum,
    require_text,
)
from issue_service import company_store, foreign_reads, store
from issue_service.events import EventType, emit
from issue_service.locks import lock_and_clear_terminal
from issue_service.model import PRIORITY_PROTO_VALUES, STATUS_PROTO_VALUES, Priority, Status
from issue_service.ownership_gate import enforce_agent_write
from issue_service.status_rules import LOCK_COLUMNS_CLEARED, is_documented_transition, status_stamps
from paperclip.issues.v1 import issues_pb2

MAX_USER_ID = 200
UPDATABLE = frozenset(
    {
        "title",
        "description",
        "status",
        "priority",
        "assignee_agent_id",
        "assignee_user_id",
        "parent_issue_id",
        "blocked_by_issue_ids",
    }
)


@dataclass(frozen=True, kw_only=True)
class IssueFields:
    """Validated values of a create or update request (None: not given)."""

    title: str | None = None
    description: str | None = None
    status: Status | None = None
    priority: Priority | None = None
    assignee_agent_id: str | None = None
    assignee_user_id: str | None = None
    parent_issue_id: str | None = None
    blocked_by: list[str] | None = None


def _user_id(value: str, field: str = "assignee_user_id") -> str | None:
    stripped = require_text(field, value, max_length=MAX_USER_ID, required=False)
    return stripped or None


async def _check_assignee_agent(tx: Tx, company_id: str, agent_id: str) -> None:
    info = await foreign_reads.agent_info(tx, agent_id)
    if info is None:
        raise NotFound("agent not found", reason="AGENT_NOT_FOUND", metadata={"agent_id": agent_id})
    if info.company_id != company_id:
        raise invalid("assignee_agent_id", "the agent must belong to the issue's company")
    if info.status == "terminated":
        raise FailedPrecondition(
            "cannot assign work to a terminated agent",
            reason="AGENT_NOT_INVOKABLE",
            metadata={"agent_id": agent_id},
        )


async def _check_references(
    tx: Tx, company_id: str, issue_id: str | None, fields: IssueFields
) -> None:
    if fields.assignee_agent_id:
        await _check_assignee_agent(tx, company_id, fields.assignee_agent_id)
    if fields.parent_issue_id:
        if fields.parent_issue_id == issue_id:
            raise invalid("parent_issue_id", "an issue cannot be its own parent")
        if await store.missing_or_foreign_issues(tx, company_id, [fields.parent_issue_id]):
            raise invalid("parent_issue_id", "no such issue in this company")
    if fields.blocked_by:
        if issue_id in fields.blocked_by:
            raise invalid("blocked_by_issue_ids", "an issue cannot block itself")
        missing = await store.missing_or_foreign_issues(tx, company_id, fields.blocked_by)
        if missing:
            raise invalid("blocked_by_issue_ids", f"no such issues in this company: {missing}")


def create_fields(request: issues_pb2.CreateIssueRequest) -> IssueFields:
    """Validate the fields of a CreateIssue request."""
    status = require_enum("status", request.status, STATUS_PROTO_VALUES, required=False)
    priority = require_enum("priority", request.priority, PRIORITY_PROTO_VALUES, required=False)
    fields = IssueFields(
        title=require_text("title", request.title, max_length=MAX_TITLE),
        description=require_text(
            "description", request.description, max_length=MAX_BODY, required=False
        ),
        status=Status.from_proto(status) if status else Status.BACKLOG,
        priority=Priority.from_proto(priority) if priority else Priority.MEDIUM,
        assignee_agent_id=parse_uuid(
            "assignee_agent_id", request.assignee_agent_id, required=False
        ),
        assignee_user_id=_user_id(request.assignee_user_id),
        parent_issue_id=parse_uuid("parent_issue_id", request.parent_issue_id, required=False),
        blocked_by=parse_uuids("blocked_by_issue_ids", request.blocked_by_issue_ids),
    )
    if fields.assignee_agent_id and fields.assignee_user_id:
        raise invalid("assignee_user_id", "an issue can only have one assignee")
    return fields


async def create_issue(
    db: Database, actor: Actor, *, company_id: str, fields: IssueFields, request_id: str
) -> issues_pb2.Issue:
    """Create an issue with the next identifier of its company; idempotent per request id."""
    company = parse_uuid("company_id", company_id)
    request = parse_uuid("request_id", request_id, required=False)
    assert company
    require_company_access(actor, company, write=True)
    if actor.is_agent:
        require_agent_run(actor)
    status = fields.status or Status.BACKLOG
    if status is Status.IN_PROGRESS and not (fields.assignee_agent_id or fields.assignee_user_id):
        raise FailedPrecondition(
            "in_progress issues require an assignee", reason="ISSUE_ASSIGNEE_REQUIRED"
        )
    async with db.unit_of_work() as tx:
        if request is not None:
            existing = await store.issue_by_request(tx, company, request)
            if existing is not None:
                return store.issue_to_proto(existing)
        await _check_references(tx, company, None, fields)
        if status is Status.IN_PROGRESS and fields.blocked_by:
            raise FailedPrecondition(
                "issue is blocked by unresolved blockers", reason="ISSUE_BLOCKED"
            )
        row = await _insert_issue(tx, actor, company, fields, status=status, request=request)
        _record_created(tx, actor, company, fields, row)
        return store.issue_to_proto(row)


class _RetryCreate(PaperclipError):
    """A concurrent request with the same request id won; read its issue instead."""


async def _insert_issue(
    tx: Tx,
    actor: Actor,
    company: str,
    fields: IssueFields,
    *,
    status: Status,
    request: str | None,
) -> Row:
    """The new issue's row (with its blockers), numbered next in its company."""
    stamps = status_stamps(status, started_at=None, now=datetime.now(UTC))
    _, _, by_agent, _ = actor.audit_identity()
    row = await store.insert_issue(
        tx,
        {
            "company": company,
            "title": fields.title,
            "description": fields.description or "",
            "status": status.value,
            "priority": (fields.priority or Priority.MEDIUM).value,
            "assignee_agent": fields.assignee_agent_id,
            "assignee_user": fields.assignee_user_id,
            "parent": fields.parent_issue_id,
            "by_agent": by_agent,
            "by_user": actor.user_id if actor.is_board else None,
            "request_id": request,
            "started_at": stamps.get("started_at"),
            "completed_at": stamps.get("completed_at"),
            "cancelled_at": stamps.get("cancelled_at"),
        },
    )
    if row is None:
        if not await company_store.company_exists(tx, company):
            raise NotFound("company not found", reason="COMPANY_NOT_FOUND")
        raise _RetryCreate("request id raced")
    if fields.blocked_by:
        await store.replace_blockers(tx, str(row["id"]), fields.blocked_by)
        row = await store.find_issue(tx, ("id", str(row["id"])))
    return row


def _record_created(tx: Tx, actor: Actor, company: str, fields: IssueFields, row: Row) -> None:
    """The audit row of a new issue, and its assignment event when an agent has it."""
    issue_id = str(row["id"])
    record_activity(
        tx,
        actor=actor,
        company_id=company,
        action="issue.created",
        entity_type="issue",
        entity_id=issue_id,
        details={
            "identifier": row["identifier"],
            "title": row["title"],
            "status": row["status"],
            "assigneeAgentId": fields.assignee_agent_id,
        },
    )
    if fields.assignee_agent_id:
        emit(
            tx,
            actor=actor,
            company_id=company,
            issue_id=issue_id,
            type=EventType.ASSIGNED,
            target_agent_id=fields.assignee_agent_id,
            payload={"identifier": row["identifier"], "status": row["status"]},
        )


async def create_issue_idempotent(
    db: Database, actor: Actor, *, company_id: str, fields: IssueFields, request_id: str
) -> issues_pb2.Issue:
    """``create_issue``, returning the winner's issue when the same request raced."""
    try:
        return await create_issue(
            db, actor, company_id=company_id, fields=fields, request_id=request_id
        )
    except _RetryCreate:
        async with db.unit_of_work() as tx:
            row = await store.issue_by_request(tx, company_id, request_id)
        if row is None:
            raise Aborted("a concurrent request with the same request id failed") from None
        return store.issue_to_proto(row)


async def get_issue(db: Database, actor: Actor, *, issue: str) -> issues_pb2.Issue:
    """One issue by UUID or identifier."""
    ref = store.parse_issue_ref("issue", issue)
    async with db.unit_of_work() as tx:
        row = await store.find_issue(tx, ref)
    require_company_access(actor, str(row["company_id"]), write=False)
    return store.issue_to_proto(row)


async def list_issues(
    db: Database,
    actor: Actor,
    *,
    company_id: str,
    statuses: Sequence[int],
    assignee_agent_id: str,
    page_size: int,
    page_token: str,
) -> tuple[list[issues_pb2.Issue], str]:
    """A page of a company's issues in identifier order."""
    company = parse_uuid("company_id", company_id)
    assignee = parse_uuid("assignee_agent_id", assignee_agent_id, required=False)
    assert company
    wanted = [
        Status.from_proto(require_enum(f"statuses[{i}]", s, STATUS_PROTO_VALUES) or 0).value
        for i, s in enumerate(statuses)
    ]
    page = parse_page(
        page_size, page_token, company=company, statuses=sorted(wanted), assignee=assignee
    )
    require_company_access(actor, company, write=False)
    after = page.cursor_int("n") if page.cursor else 0
    async with db.unit_of_work() as tx:
        rows = await store.issues_page(
            tx,
            company_id=company,
            after=after,
            statuses=wanted or None,
            assignee_agent_id=assignee,
            limit=page.fetch_limit,
        )
    shown, token = page.finish(rows, lambda row: {"n": row["issue_number"]})
    return [store.issue_to_proto(r) for r in shown], token


def update_fields(issue: issues_pb2.Issue, paths: Sequence[str]) -> IssueFields:
    """Validate the masked fields of an UpdateIssue request."""
    if not paths:
        raise invalid("update_mask", "at least one path is required")
    unknown = [p for p in paths if p not in UPDATABLE]
    if unknown:
        raise invalid("update_mask", f"not updatable: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    if "title" in paths:
        values["title"] = require_text("issue.title", issue.title, max_length=MAX_TITLE)
    if "description" in paths:
        values["description"] = require_text(
            "issue.description", issue.description, max_length=MAX_BODY, required=False
        )
    if "status" in paths:
        status = require_enum("issue.status", issue.status, STATUS_PROTO_VALUES)
        values["status"] = Status.from_proto(status or 0)
    if "priority" in paths:
        priority = require_enum("issue.priority", issue.priority, PRIORITY_PROTO_VALUES)
        values["priority"] = Priority.from_proto(priority or 0)
    if "assignee_agent_id" in paths:
        values["assignee_agent_id"] = (
            parse_uuid("issue.assignee_agent_id", issue.assignee_agent_id, required=False) or ""
        )
    if "assignee_user_id" in paths:
        values["assignee_user_id"] = (
            _user_id(issue.assignee_user_id, "issue.assignee_user_id") or ""
        )
    if "parent_issue_id" in paths:
        values["parent_issue_id"] = (
            parse_uuid("issue.parent_issue_id", issue.parent_issue_id, required=False) or ""
        )
    if "blocked_by_issue_ids" in paths:
        values["blocked_by"] = parse_uuids("issue.blocked_by_issue_ids", issue.blocked_by_issue_ids)
    if values.get("assignee_agent_id") and values.get("assignee_user_id"):
        raise invalid("issue.assignee_user_id", "an issue can only have one assignee")
    return IssueFields(**values)


def _changes(row: Row, fields: IssueFields, now: datetime) -> dict[str, Any]:
    """Column changes of an update, with the status and reassignment side effects."""
    values: dict[str, Any] = {}
    for column in ("title", "description"):
        new = getattr(fields, column)
        if new is not None and new != row[column]:
            values[column] = new
    if fields.priority is not None and fields.priority.value != row["priority"]:
        values["priority"] = fields.priority.value
    for column in ("assignee_agent_id", "assignee_user_id", "parent_issue_id"):
        new = getattr(fields, column)
        if new is not None and (new or None) != text_or_none(row[column]):
            values[column] = new or None
    if values.get("assignee_agent_id"):
        values.setdefault("assignee_user_id", None)
    if values.get("assignee_user_id"):
        values.setdefault("assignee_agent_id", None)
    if fields.status is not None and fields.status.value != row["status"]:
        values.update(status_stamps(fields.status, started_at=row["started_at"], now=now))
    if "assignee_agent_id" in values or "assignee_user_id" in values:
        values.update(LOCK_COLUMNS_CLEARED)
    return values


async def _validate_status_change(tx: Tx, actor: Actor, row: Row, values: dict[str, Any]) -> bool:
    """Whether a board user went outside the documented transitions (agents may not).

    Also refuses an in_progress issue without an assignee, whether the update moves it
    to in_progress or unassigns it while in progress."""
    current = Status(row["status"])
    target = Status(values.get("status", row["status"]))
    assignee_agent = values.get("assignee_agent_id", row["assignee_agent_id"])
    assignee_user = values.get("assignee_user_id", row["assignee_user_id"])
    if target is Status.IN_PROGRESS and assignee_agent is None and assignee_user is None:
        raise FailedPrecondition(
            "in_progress issues require an assignee", reason="ISSUE_ASSIGNEE_REQUIRED"
        )
    if "status" not in values:
        return False
    if target is Status.IN_PROGRESS:
        blockers = await store.open_blockers(tx, str(row["id"]))
        if blockers:
            raise FailedPrecondition(
                "issue is blocked by unresolved blockers",
                reason="ISSUE_BLOCKED",
                metadata={"unresolved_blocker_issue_ids": ",".join(blockers)},
            )
    documented = is_documented_transition(current, target)
    if not documented and not actor.is_board:
        raise FailedPrecondition(
            f"agents cannot move an issue from {current.value} to {target.value}",
            reason="INVALID_STATUS_TRANSITION",
            metadata={"from": current.value, "to": target.value},
        )
    return not documented


async def update_issue(
    db: Database, actor: Actor, *, issue_id: str, fields: IssueFields
) -> issues_pb2.Issue:
    """Apply an update with its side effects, audit row and outbox events."""
    issue = parse_uuid("issue.id", issue_id)
    assert issue
    async with db.unit_of_work() as tx:
        locked = await lock_and_clear_terminal(tx, issue)
        if locked is None:
            raise NotFound("issue not found", reason="ISSUE_NOT_FOUND")
        company = str(locked.row["company_id"])
        require_company_access(actor, company, write=True)
        row = await enforce_agent_write(tx, actor, locked.row)
        await _check_references(tx, company, issue, fields)
        values = _changes(row, fields, datetime.now(UTC))
        override = await _validate_status_change(tx, actor, row, values)
        blockers_changed = fields.blocked_by is not None and sorted(fields.blocked_by) != sorted(
            str(b) for b in row["blocked_by"] or ()
        )
        if not values and not blockers_changed:
            return store.issue_to_proto(row)
        if blockers_changed and fields.blocked_by is not None:
            await store.replace_blockers(tx, issue, fields.blocked_by)
        updated = (
            await store.update_issue_row(tx, issue, values)
            if values
            else await store.find_issue(tx, ("id", issue))
        )
        await _record_update(
            tx, actor, row, updated, values, override=override, blockers_changed=blockers_changed
        )
        return store.issue_to_proto(updated)


async def _record_update(
    tx: Tx,
    actor: Actor,
    before: Row,
    after: Row,
    values: dict[str, Any],
    *,
    override: bool,
    blockers_changed: bool,
) -> None:
    company, issue = str(after["company_id"]), str(after["id"])
    changed = {k: after[k] for k in values if k in after and not k.endswith("_at")}
    if blockers_changed:
        changed["blocked_by"] = after["blocked_by"]
    details: dict[str, Any] = {
        **changed,
        "identifier": after["identifier"],
        "_previous": {k: before[k] for k in changed if k in before},
    }
    if override:
        details["boardOverride"] = True
    record_activity(
        tx,
        actor=actor,
        company_id=company,
        action="issue.updated",
        entity_type="issue",
        entity_id=issue,
        details=details,
    )
    new_agent = text_or_none(after["assignee_agent_id"])
    if "assignee_agent_id" in values and new_agent:
        emit(
            tx,
            actor=actor,
            company_id=company,
            issue_id=issue,
            type=EventType.ASSIGNED,
            target_agent_id=new_agent,
            payload={"identifier": after["identifier"], "status": after["status"]},
        )
    if "status" in values:
        emit(
            tx,
            actor=actor,
            company_id=company,
            issue_id=issue,
            type=EventType.STATUS_CHANGED,
            target_agent_id=new_agent,
            payload={
                "from": before["status"],
                "to": after["status"],
                "executionRunId": text_or_none(before["execution_run_id"]),
            },
        )
