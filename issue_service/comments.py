"""Comments, with the reopen and resume rules and the wakes they cause.

- A human (board) comment reopens a done or blocked issue that has an agent assignee,
  unless blockers are unresolved or the commenter's run holds the issue; ``reopen``
  also reopens a cancelled issue.
- Agents never reopen implicitly; the assignee resumes explicitly with ``resume``
  (its ``reopen`` is ignored); other agents may comment but neither reopen nor resume.
- ``interrupt`` (board only) asks the run service to cancel the executing run.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.actor import Actor
from common.audit import record_activity
from common.authz import require_board, require_company_access
from common.db import Database
from common.errors import FailedPrecondition, NotFound, PermissionDenied
from common.pagination import created_cursor, parse_page
from common.protoconv import text as opt
from common.protoconv import text_or_none, timestamp
from common.sql import Row, Tx
from common.validation import MAX_BODY, parse_uuid, require_text
from issue_service import comment_store, store
from issue_service.events import EventType, emit
from issue_service.locks import lock_and_clear_terminal
from issue_service.mentions import resolve_mentions
from issue_service.model import Status
from issue_service.ownership_gate import enforce_agent_write
from issue_service.status_moves import move_status
from paperclip.issues.v1 import issues_pb2

SNIPPET = 120


@dataclass(frozen=True, kw_only=True)
class CommentFlags:
    reopen: bool = False
    resume: bool = False
    interrupt: bool = False


def comment_to_proto(row: Row) -> issues_pb2.Comment:
    return issues_pb2.Comment(
        id=str(row["id"]),
        company_id=str(row["company_id"]),
        issue_id=str(row["issue_id"]),
        body=row["body"],
        author_type=row["author_type"],
        author_agent_id=opt(row["author_agent_id"]),
        author_user_id=opt(row["author_user_id"]),
        created_by_run_id=opt(row["created_by_run_id"]),
        created_at=timestamp(row["created_at"]),
    )


async def insert_comment(
    tx: Tx, actor: Actor, row: Row, body: str, *, key: str | None = None
) -> Row | None:
    """Insert a comment by ``actor`` (None when ``key`` was used before); touches the issue."""
    author_type = {"agent": "agent", "user": "user"}.get(actor.audit_identity()[0], "system")
    return await comment_store.insert_comment(
        tx,
        {
            "company": row["company_id"],
            "issue": row["id"],
            "body": body,
            "author_type": author_type,
            "agent": actor.agent_id if actor.is_agent else None,
            "user": actor.user_id if actor.is_board else None,
            "run": actor.run_id,
            "key": key,
        },
    )


async def _reopen_target(tx: Tx, actor: Actor, row: Row, flags: CommentFlags) -> Status | None:
    """The status the issue was reopened from, or None when the comment reopens nothing."""
    status = Status(row["status"])
    agent_assignee = text_or_none(row["assignee_agent_id"])
    if actor.is_agent:
        if (flags.resume or flags.reopen) and agent_assignee != actor.agent_id:
            raise PermissionDenied(
                "only the assignee can resume the issue",
                reason="AGENT_MISMATCH",
                metadata={"issue_id": str(row["id"]), "assignee_agent_id": agent_assignee or ""},
            )
        if not flags.resume:
            return None  # the assignee's ``reopen`` is a log line, not a reopen
        if status is Status.CANCELLED:
            raise FailedPrecondition(
                "cancelled issues must be restored by the board", reason="ISSUE_CANCELLED"
            )
        if status not in (Status.DONE, Status.BLOCKED, Status.IN_REVIEW):
            return None
        if await store.open_blockers(tx, str(row["id"])):
            raise FailedPrecondition(
                "issue is blocked by unresolved blockers", reason="ISSUE_BLOCKED"
            )
        return status
    if not actor.is_board:
        return None
    holds = actor.run_id is not None and actor.run_id in (
        text_or_none(row["checkout_run_id"]),
        text_or_none(row["execution_run_id"]),
    )
    if holds:
        return None
    if flags.reopen and status in (Status.DONE, Status.CANCELLED):
        return status
    if agent_assignee and status in (Status.DONE, Status.BLOCKED):
        if await store.open_blockers(tx, str(row["id"])):
            return None
        return status
    return None


async def add_comment(
    db: Database, actor: Actor, *, issue_id: str, body: str, flags: CommentFlags
) -> issues_pb2.Comment:
    """Add a comment; reopen, resume and interrupt as the rules say; wake who cares."""
    issue = parse_uuid("issue_id", issue_id)
    text_body = require_text("body", body, max_length=MAX_BODY)
    assert issue
    if flags.interrupt:
        require_board(actor)
    async with db.unit_of_work() as tx:
        locked = await lock_and_clear_terminal(tx, issue)
        if locked is None:
            raise NotFound("issue not found", reason="ISSUE_NOT_FOUND")
        company = str(locked.row["company_id"])
        require_company_access(actor, company, write=True)
        row = await enforce_agent_write(tx, actor, locked.row, allow_non_assignee=True)
        reopened_from = await _reopen_target(tx, actor, row, flags)
        if reopened_from is not None:
            # The wake is the issue.reopened event written with the comment.
            row = await move_status(
                tx,
                actor,
                row,
                Status.TODO,
                details={
                    "reopened": True,
                    "reopenedFrom": reopened_from.value,
                    "source": "comment",
                },
            )
        comment = await insert_comment(tx, actor, row, text_body)
        assert comment is not None
        await _record_comment(tx, actor, row, comment, reopened_from=reopened_from, flags=flags)
        return comment_to_proto(comment)


async def _record_comment(
    tx: Tx,
    actor: Actor,
    row: Row,
    comment: Row,
    *,
    reopened_from: Status | None,
    flags: CommentFlags,
) -> None:
    """The audit row of a comment and the outbox events it causes: a reopen or a comment
    event for the assignee, a mention event per other agent named, an interrupt."""
    _audit_comment(tx, actor, row, comment, reopened_from)
    await _emit_wakes(tx, actor, row, comment, reopened_from=reopened_from, flags=flags)
    if flags.interrupt:
        _request_interrupt(tx, actor, row, str(comment["id"]))


def _audit_comment(
    tx: Tx, actor: Actor, row: Row, comment: Row, reopened_from: Status | None
) -> None:
    details: dict[str, object] = {
        "commentId": str(comment["id"]),
        "bodySnippet": comment["body"][:SNIPPET],
        "identifier": row["identifier"],
        "issueTitle": row["title"],
    }
    if reopened_from is not None:
        details.update({"reopened": True, "reopenedFrom": reopened_from.value, "source": "comment"})
    record_activity(
        tx,
        actor=actor,
        company_id=str(row["company_id"]),
        action="issue.comment_added",
        entity_type="issue",
        entity_id=str(row["id"]),
        details=details,
    )


async def _emit_wakes(
    tx: Tx,
    actor: Actor,
    row: Row,
    comment: Row,
    *,
    reopened_from: Status | None,
    flags: CommentFlags,
) -> None:
    """One event per agent to wake: the assignee (reopened, or commented while open),
    then each other agent mentioned; never the commenting agent itself."""
    company, issue = str(row["company_id"]), str(row["id"])
    comment_id = str(comment["id"])
    woken: set[str] = set()
    if actor.is_agent and actor.agent_id:
        woken.add(actor.agent_id)
    woken |= _wake_assignee(
        tx, actor, row, comment_id, woken, reopened_from=reopened_from, flags=flags
    )
    for agent_id in await resolve_mentions(tx, company, comment["body"]):
        if agent_id in woken:
            continue
        woken.add(agent_id)
        emit(
            tx,
            actor=actor,
            company_id=company,
            issue_id=issue,
            type=EventType.MENTIONED,
            target_agent_id=agent_id,
            payload={"issueId": issue, "commentId": comment_id},
        )


def _wake_assignee(
    tx: Tx,
    actor: Actor,
    row: Row,
    comment_id: str,
    woken: set[str],
    *,
    reopened_from: Status | None,
    flags: CommentFlags,
) -> set[str]:
    """The reopen event for the assignee, or the comment event while the issue is open
    (unless ``woken`` has it already); the assignee woken, if any."""
    company, issue = str(row["company_id"]), str(row["id"])
    assignee = text_or_none(row["assignee_agent_id"])
    if reopened_from is not None and assignee:
        emit(
            tx,
            actor=actor,
            company_id=company,
            issue_id=issue,
            type=EventType.REOPENED,
            target_agent_id=assignee,
            payload={
                "issueId": issue,
                "commentId": comment_id,
                "reopenedFrom": reopened_from.value,
                "mutation": "comment",
                "resumeIntent": flags.resume and actor.is_agent,
            },
        )
        return {assignee}
    if assignee and assignee not in woken and row["status"] not in (Status.DONE, Status.CANCELLED):
        emit(
            tx,
            actor=actor,
            company_id=company,
            issue_id=issue,
            type=EventType.COMMENTED,
            target_agent_id=assignee,
            payload={"issueId": issue, "commentId": comment_id},
        )
        return {assignee}
    return set()


def _request_interrupt(tx: Tx, actor: Actor, row: Row, comment_id: str) -> None:
    company, issue = str(row["company_id"]), str(row["id"])
    run = text_or_none(row["execution_run_id"])
    record_activity(
        tx,
        actor=actor,
        company_id=company,
        action="issue.interrupt_requested",
        entity_type="issue",
        entity_id=issue,
        details={"runId": run, "commentId": comment_id, "source": "issue_comment_interrupt"},
    )
    emit(
        tx,
        actor=actor,
        company_id=company,
        issue_id=issue,
        type=EventType.INTERRUPT_REQUESTED,
        target_agent_id=text_or_none(row["assignee_agent_id"]),
        payload={"runId": run, "commentId": comment_id},
    )


async def list_comments(
    db: Database, actor: Actor, *, issue_id: str, page_size: int, page_token: str
) -> tuple[list[issues_pb2.Comment], str]:
    """A page of an issue's comments, oldest first."""
    issue = parse_uuid("issue_id", issue_id)
    assert issue
    page = parse_page(page_size, page_token, issue=issue)
    async with db.unit_of_work() as tx:
        row = await store.find_issue(tx, ("id", issue))
        require_company_access(actor, str(row["company_id"]), write=False)
        after_ts = page.cursor_time("t") if page.cursor else None
        after_id = page.cursor_uuid("i") if page.cursor else None
        rows = await comment_store.comments_page(
            tx, issue, after_ts=after_ts, after_id=after_id, limit=page.fetch_limit
        )
    shown, token = page.finish(rows, created_cursor)
    return [comment_to_proto(r) for r in shown], token
