"""Bad input on every IssueService and IssueLockService RPC: INVALID_ARGUMENT with a
BadRequest violation naming the field, nothing written, never INTERNAL or UNKNOWN.
Also NOT_FOUND for well-formed unknown ids, and List pagination."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import text

from common.errors import PaperclipError
from common.pagination import parse_page
from paperclip.issues.v1 import issue_locks_pb2, issues_pb2
from tests.harness import (
    Clients,
    Suite,
    admin,
    expect_error,
    insert_run,
    new_agent,
    new_company,
    service,
)

TODO = issues_pb2.ISSUE_STATUS_TODO
LONG_TITLE = "t" * 501
LONG_BODY = "b" * 100_001
NUL = "bad\x00value"
NOT_UUID = "not-a-uuid"
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@dataclass
class Ctx:
    """One company with an agent, a live run, two issues, comments and page tokens."""

    board: Clients
    internal: Clients
    company: issues_pb2.Company
    agent_id: str
    run_id: str
    issue: issues_pb2.Issue
    other_issue: issues_pb2.Issue
    issues_token: str
    comments_token: str
    activity_token: str


@pytest.fixture(scope="module")
async def ctx(suite: Suite) -> AsyncIterator[Ctx]:
    board = suite.clients(admin())
    company = await new_company(board, "Input Co")
    bot = await new_agent(board, company.id)
    run = await insert_run(suite.db, company_id=company.id, agent_id=bot.id)
    issue = await board.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company.id, title="First", status=TODO)
    )
    other = await board.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company.id, title="Second", status=TODO)
    )
    for body in ("one", "two"):
        await board.issues.AddComment(issues_pb2.AddCommentRequest(issue_id=issue.id, body=body))
    issues_page = await board.issues.ListIssues(
        issues_pb2.ListIssuesRequest(company_id=company.id, page_size=1)
    )
    comments_page = await board.issues.ListComments(
        issues_pb2.ListCommentsRequest(issue_id=issue.id, page_size=1)
    )
    activity_page = await board.issues.ListActivity(
        issues_pb2.ListActivityRequest(company_id=company.id, page_size=1)
    )
    assert issues_page.next_page_token and comments_page.next_page_token
    assert activity_page.next_page_token
    yield Ctx(
        board,
        suite.clients(service()),
        company,
        bot.id,
        run,
        issue,
        other,
        issues_page.next_page_token,
        comments_page.next_page_token,
        activity_page.next_page_token,
    )


async def _counts(suite: Suite, company_id: str) -> dict[str, int]:
    """Rows of the company in every table a write would touch, and all companies."""
    out: dict[str, int] = {}
    async with suite.db.transaction() as conn:
        for table in (
            "issues.issues",
            "issues.issue_comments",
            "issues.issue_events",
            "audit.activity_log",
        ):
            out[table] = int(
                (
                    await conn.execute(
                        text(f"SELECT count(*) FROM {table} WHERE company_id = :c"),
                        {"c": company_id},
                    )
                ).scalar_one()
            )
        out["issues.companies"] = int(
            (await conn.execute(text("SELECT count(*) FROM issues.companies"))).scalar_one()
        )
        out["issues.issue_blockers"] = int(
            (await conn.execute(text("SELECT count(*) FROM issues.issue_blockers"))).scalar_one()
        )
    return out


async def _issue_rows(suite: Suite, company_id: str) -> list[dict[str, Any]]:
    async with suite.db.transaction() as conn:
        rows = await conn.execute(
            text("SELECT * FROM issues.issues WHERE company_id = :c ORDER BY issue_number"),
            {"c": company_id},
        )
        return [dict(r) for r in rows.mappings().all()]


async def _refused_unchanged(suite: Suite, ctx: Ctx, call: Awaitable[Any]) -> PaperclipError:
    before = (await _counts(suite, ctx.company.id), await _issue_rows(suite, ctx.company.id))
    error = await expect_error(call)
    after = (await _counts(suite, ctx.company.id), await _issue_rows(suite, ctx.company.id))
    assert error.code not in NEVER, (error.code, error.reason, error.message)
    assert after == before
    return error


Call = Callable[[Ctx], Awaitable[Any]]


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def _update(ctx: Ctx, mask: tuple[str, ...], **fields: Any) -> Awaitable[Any]:
    return ctx.board.issues.UpdateIssue(
        issues_pb2.UpdateIssueRequest(
            issue=issues_pb2.Issue(**{"id": ctx.issue.id, **fields}), update_mask=_mask(*mask)
        )
    )


def _create(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    values: dict[str, Any] = {"company_id": ctx.company.id, "title": "ok"}
    values.update(fields)
    return ctx.board.issues.CreateIssue(issues_pb2.CreateIssueRequest(**values))


def _checkout(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    values: dict[str, Any] = {
        "issue_id": ctx.issue.id,
        "agent_id": ctx.agent_id,
        "expected_statuses": [TODO],
    }
    values.update(fields)
    return ctx.board.issues.CheckoutIssue(issues_pb2.CheckoutIssueRequest(**values))


def _comment(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    values: dict[str, Any] = {"issue_id": ctx.issue.id, "body": "ok"}
    values.update(fields)
    return ctx.board.issues.AddComment(issues_pb2.AddCommentRequest(**values))


def _list_issues(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    values: dict[str, Any] = {"company_id": ctx.company.id}
    values.update(fields)
    return ctx.board.issues.ListIssues(issues_pb2.ListIssuesRequest(**values))


def _list_comments(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    values: dict[str, Any] = {"issue_id": ctx.issue.id}
    values.update(fields)
    return ctx.board.issues.ListComments(issues_pb2.ListCommentsRequest(**values))


def _list_activity(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    values: dict[str, Any] = {"company_id": ctx.company.id}
    values.update(fields)
    return ctx.board.issues.ListActivity(issues_pb2.ListActivityRequest(**values))


def _acquire(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    values = {"issue_id": ctx.issue.id, "run_id": ctx.run_id, "agent_id": ctx.agent_id}
    values.update(fields)
    return ctx.internal.locks.AcquireExecutionLock(
        issue_locks_pb2.AcquireExecutionLockRequest(**values)
    )


def _transfer(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    values = {"issue_id": ctx.issue.id, "from_run_id": ctx.run_id, "to_run_id": ctx.run_id}
    values.update(fields)
    return ctx.internal.locks.TransferExecutionLock(
        issue_locks_pb2.TransferExecutionLockRequest(**values)
    )


def _escalate(ctx: Ctx, **fields: Any) -> Awaitable[Any]:
    values = {"issue_id": ctx.issue.id, "body": "stranded"}
    values.update(fields)
    return ctx.internal.locks.EscalateStrandedIssue(
        issue_locks_pb2.EscalateStrandedIssueRequest(**values)
    )


def _bad_uuid_cases(rpc: str, field: str, call: Callable[[Ctx, str], Awaitable[Any]]) -> list[Any]:
    """Malformed, empty and NUL-carrying values of one UUID field."""
    return [
        pytest.param(lambda c, v=value: call(c, v), field, id=f"{rpc}-{field}-{label}")
        for label, value in (
            ("malformed", NOT_UUID),
            ("empty", ""),
            ("nul", "\x00"),
            ("almost", UNKNOWN_ID[:-1] + "g"),
            ("huge", "a" * 10_000),
        )
    ]


CASES: list[Any] = [
    # CreateCompany
    pytest.param(
        lambda c: c.board.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="", issue_prefix="EMPTYNAME")
        ),
        "name",
        id="CreateCompany-name-empty",
    ),
    pytest.param(
        lambda c: c.board.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="   ", issue_prefix="BLANKNAME")
        ),
        "name",
        id="CreateCompany-name-blank",
    ),
    pytest.param(
        lambda c: c.board.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="n" * 201, issue_prefix="LONGNAME")
        ),
        "name",
        id="CreateCompany-name-huge",
    ),
    pytest.param(
        lambda c: c.board.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name=NUL, issue_prefix="NULNAME")
        ),
        "name",
        id="CreateCompany-name-nul",
    ),
    pytest.param(
        lambda c: c.board.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="Ok", issue_prefix="A1")
        ),
        "issue_prefix",
        id="CreateCompany-prefix-digit",
    ),
    pytest.param(
        lambda c: c.board.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="Ok", issue_prefix="A")
        ),
        "issue_prefix",
        id="CreateCompany-prefix-short",
    ),
    pytest.param(
        lambda c: c.board.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="Ok", issue_prefix="ABCDEFGHIJK")
        ),
        "issue_prefix",
        id="CreateCompany-prefix-long",
    ),
    pytest.param(
        lambda c: c.board.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="Ok", issue_prefix="AB\x00")
        ),
        "issue_prefix",
        id="CreateCompany-prefix-nul",
    ),
    # GetCompany
    *_bad_uuid_cases(
        "GetCompany",
        "company_id",
        lambda c, v: c.board.issues.GetCompany(issues_pb2.GetCompanyRequest(company_id=v)),
    ),
    # ListCompanies
    pytest.param(
        lambda c: c.board.issues.ListCompanies(issues_pb2.ListCompaniesRequest(page_size=-1)),
        "page_size",
        id="ListCompanies-size-neg",
    ),
    pytest.param(
        lambda c: c.board.issues.ListCompanies(
            issues_pb2.ListCompaniesRequest(page_token="garbage!!")
        ),
        "page_token",
        id="ListCompanies-token-garbage",
    ),
    pytest.param(
        lambda c: c.board.issues.ListCompanies(
            issues_pb2.ListCompaniesRequest(page_token=c.issues_token)
        ),
        "page_token",
        id="ListCompanies-token-of-ListIssues",
    ),
    # CreateIssue
    *_bad_uuid_cases("CreateIssue", "company_id", lambda c, v: _create(c, company_id=v)),
    pytest.param(lambda c: _create(c, title=""), "title", id="CreateIssue-title-empty"),
    pytest.param(lambda c: _create(c, title=" \t "), "title", id="CreateIssue-title-blank"),
    pytest.param(lambda c: _create(c, title=LONG_TITLE), "title", id="CreateIssue-title-huge"),
    pytest.param(lambda c: _create(c, title=NUL), "title", id="CreateIssue-title-nul"),
    pytest.param(
        lambda c: _create(c, description=LONG_BODY),
        "description",
        id="CreateIssue-description-huge",
    ),
    pytest.param(
        lambda c: _create(c, description=NUL), "description", id="CreateIssue-description-nul"
    ),
    pytest.param(lambda c: _create(c, status=99), "status", id="CreateIssue-status-99"),
    pytest.param(lambda c: _create(c, status=-1), "status", id="CreateIssue-status-neg"),
    pytest.param(lambda c: _create(c, priority=42), "priority", id="CreateIssue-priority-42"),
    pytest.param(
        lambda c: _create(c, assignee_agent_id=NOT_UUID),
        "assignee_agent_id",
        id="CreateIssue-assignee_agent_id-malformed",
    ),
    pytest.param(
        lambda c: _create(c, assignee_user_id="u" * 201),
        "assignee_user_id",
        id="CreateIssue-assignee_user_id-huge",
    ),
    pytest.param(
        lambda c: _create(c, assignee_user_id=NUL),
        "assignee_user_id",
        id="CreateIssue-assignee_user_id-nul",
    ),
    pytest.param(
        lambda c: _create(c, assignee_agent_id=c.agent_id, assignee_user_id="someone"),
        "assignee_user_id",
        id="CreateIssue-both-assignees",
    ),
    pytest.param(
        lambda c: _create(c, parent_issue_id=NOT_UUID),
        "parent_issue_id",
        id="CreateIssue-parent-malformed",
    ),
    pytest.param(
        lambda c: _create(c, request_id=NOT_UUID),
        "request_id",
        id="CreateIssue-request_id-malformed",
    ),
    pytest.param(
        lambda c: _create(c, blocked_by_issue_ids=[NOT_UUID]),
        "blocked_by_issue_ids[0]",
        id="CreateIssue-blocked_by-malformed",
    ),
    pytest.param(
        lambda c: _create(c, blocked_by_issue_ids=[c.other_issue.id, ""]),
        "blocked_by_issue_ids[1]",
        id="CreateIssue-blocked_by-empty",
    ),
    pytest.param(
        lambda c: _create(c, blocked_by_issue_ids=[str(uuid.uuid4()) for _ in range(101)]),
        "blocked_by_issue_ids",
        id="CreateIssue-blocked_by-too-many",
    ),
    # GetIssue
    pytest.param(
        lambda c: c.board.issues.GetIssue(issues_pb2.GetIssueRequest(issue="")),
        "issue",
        id="GetIssue-empty",
    ),
    pytest.param(
        lambda c: c.board.issues.GetIssue(issues_pb2.GetIssueRequest(issue="not-an-id")),
        "issue",
        id="GetIssue-not-an-id",
    ),
    pytest.param(
        lambda c: c.board.issues.GetIssue(issues_pb2.GetIssueRequest(issue="PAP-")),
        "issue",
        id="GetIssue-identifier-without-number",
    ),
    pytest.param(
        lambda c: c.board.issues.GetIssue(issues_pb2.GetIssueRequest(issue="PAP-1x")),
        "issue",
        id="GetIssue-identifier-junk",
    ),
    pytest.param(
        lambda c: c.board.issues.GetIssue(issues_pb2.GetIssueRequest(issue="PAP-" + "9" * 19)),
        "issue",
        id="GetIssue-huge-number",
    ),
    pytest.param(
        lambda c: c.board.issues.GetIssue(issues_pb2.GetIssueRequest(issue="\x00")),
        "issue",
        id="GetIssue-nul",
    ),
    pytest.param(
        lambda c: c.board.issues.GetIssue(issues_pb2.GetIssueRequest(issue="x" * 10_000)),
        "issue",
        id="GetIssue-huge",
    ),
    # ListIssues
    *_bad_uuid_cases("ListIssues", "company_id", lambda c, v: _list_issues(c, company_id=v)),
    pytest.param(
        lambda c: _list_issues(c, statuses=[99]), "statuses[0]", id="ListIssues-status-99"
    ),
    pytest.param(
        lambda c: _list_issues(c, statuses=[TODO, 42]),
        "statuses[1]",
        id="ListIssues-second-status-42",
    ),
    pytest.param(
        lambda c: _list_issues(c, statuses=[0]), "statuses[0]", id="ListIssues-status-unspecified"
    ),
    pytest.param(
        lambda c: _list_issues(c, assignee_agent_id=NOT_UUID),
        "assignee_agent_id",
        id="ListIssues-assignee-malformed",
    ),
    pytest.param(lambda c: _list_issues(c, page_size=-1), "page_size", id="ListIssues-size-neg"),
    pytest.param(
        lambda c: _list_issues(c, page_token="garbage"), "page_token", id="ListIssues-token-garbage"
    ),
    pytest.param(
        lambda c: _list_issues(c, page_token="\x00\x01"), "page_token", id="ListIssues-token-binary"
    ),
    pytest.param(
        lambda c: _list_issues(c, page_token="eyJmIjoxfQ"),
        "page_token",
        id="ListIssues-token-json-without-cursor",
    ),
    pytest.param(
        lambda c: _list_issues(c, page_token=c.issues_token, statuses=[TODO]),
        "page_token",
        id="ListIssues-token-other-statuses",
    ),
    pytest.param(
        lambda c: _list_issues(c, page_token=c.issues_token, assignee_agent_id=c.agent_id),
        "page_token",
        id="ListIssues-token-other-assignee",
    ),
    pytest.param(
        lambda c: _list_issues(c, page_token=c.activity_token),
        "page_token",
        id="ListIssues-token-of-ListActivity",
    ),
    # UpdateIssue
    *_bad_uuid_cases(
        "UpdateIssue",
        "issue.id",
        lambda c, v: c.board.issues.UpdateIssue(
            issues_pb2.UpdateIssueRequest(
                issue=issues_pb2.Issue(id=v, title="x"), update_mask=_mask("title")
            )
        ),
    ),
    pytest.param(lambda c: _update(c, (), title="x"), "update_mask", id="UpdateIssue-mask-empty"),
    pytest.param(
        lambda c: _update(c, ("identifier",), identifier="X-1"),
        "update_mask",
        id="UpdateIssue-mask-not-updatable",
    ),
    pytest.param(lambda c: _update(c, ("bogus",)), "update_mask", id="UpdateIssue-mask-unknown"),
    pytest.param(
        lambda c: _update(c, ("title", "checkout_run_id"), title="x"),
        "update_mask",
        id="UpdateIssue-mask-one-bad-path",
    ),
    pytest.param(
        lambda c: _update(c, ("title",), title=""), "issue.title", id="UpdateIssue-title-empty"
    ),
    pytest.param(
        lambda c: _update(c, ("title",), title=LONG_TITLE),
        "issue.title",
        id="UpdateIssue-title-huge",
    ),
    pytest.param(
        lambda c: _update(c, ("title",), title=NUL), "issue.title", id="UpdateIssue-title-nul"
    ),
    pytest.param(
        lambda c: _update(c, ("description",), description=LONG_BODY),
        "issue.description",
        id="UpdateIssue-description-huge",
    ),
    pytest.param(
        lambda c: _update(c, ("description",), description=NUL),
        "issue.description",
        id="UpdateIssue-description-nul",
    ),
    pytest.param(
        lambda c: _update(c, ("status",), status=99), "issue.status", id="UpdateIssue-status-99"
    ),
    pytest.param(
        lambda c: _update(c, ("status",)), "issue.status", id="UpdateIssue-status-unspecified"
    ),
    pytest.param(
        lambda c: _update(c, ("priority",), priority=42),
        "issue.priority",
        id="UpdateIssue-priority-42",
    ),
    pytest.param(
        lambda c: _update(c, ("assignee_agent_id",), assignee_agent_id=NOT_UUID),
        "issue.assignee_agent_id",
        id="UpdateIssue-assignee-malformed",
    ),
    pytest.param(
        lambda c: _update(
            c,
            ("assignee_agent_id", "assignee_user_id"),
            assignee_agent_id=c.agent_id,
            assignee_user_id="someone",
        ),
        "issue.assignee_user_id",
        id="UpdateIssue-both-assignees",
    ),
    pytest.param(
        lambda c: _update(c, ("assignee_user_id",), assignee_user_id=NUL),
        "issue.assignee_user_id",
        id="UpdateIssue-assignee_user-nul",
    ),
    pytest.param(
        lambda c: _update(c, ("parent_issue_id",), parent_issue_id=NOT_UUID),
        "issue.parent_issue_id",
        id="UpdateIssue-parent-malformed",
    ),
    pytest.param(
        lambda c: _update(c, ("blocked_by_issue_ids",), blocked_by_issue_ids=[NOT_UUID]),
        "issue.blocked_by_issue_ids[0]",
        id="UpdateIssue-blocked_by-malformed",
    ),
    # CheckoutIssue
    *_bad_uuid_cases("CheckoutIssue", "issue_id", lambda c, v: _checkout(c, issue_id=v)),
    *_bad_uuid_cases("CheckoutIssue", "agent_id", lambda c, v: _checkout(c, agent_id=v)),
    pytest.param(
        lambda c: _checkout(c, expected_statuses=[]),
        "expected_statuses",
        id="CheckoutIssue-expected-empty",
    ),
    pytest.param(
        lambda c: _checkout(c, expected_statuses=[99]),
        "expected_statuses[0]",
        id="CheckoutIssue-expected-99",
    ),
    pytest.param(
        lambda c: _checkout(c, expected_statuses=[TODO, 42]),
        "expected_statuses[1]",
        id="CheckoutIssue-expected-second-42",
    ),
    pytest.param(
        lambda c: _checkout(c, expected_statuses=[0]),
        "expected_statuses[0]",
        id="CheckoutIssue-expected-unspecified",
    ),
    # ReleaseIssue / ForceReleaseIssue
    *_bad_uuid_cases(
        "ReleaseIssue",
        "issue_id",
        lambda c, v: c.board.issues.ReleaseIssue(issues_pb2.ReleaseIssueRequest(issue_id=v)),
    ),
    *_bad_uuid_cases(
        "ForceReleaseIssue",
        "issue_id",
        lambda c, v: c.board.issues.ForceReleaseIssue(
            issues_pb2.ForceReleaseIssueRequest(issue_id=v, clear_assignee=True)
        ),
    ),
    # AddComment
    *_bad_uuid_cases("AddComment", "issue_id", lambda c, v: _comment(c, issue_id=v)),
    pytest.param(lambda c: _comment(c, body=""), "body", id="AddComment-body-empty"),
    pytest.param(lambda c: _comment(c, body="\n \t"), "body", id="AddComment-body-blank"),
    pytest.param(lambda c: _comment(c, body=LONG_BODY), "body", id="AddComment-body-huge"),
    pytest.param(lambda c: _comment(c, body=NUL), "body", id="AddComment-body-nul"),
    pytest.param(
        lambda c: _comment(c, body=NUL, reopen=True, interrupt=True),
        "body",
        id="AddComment-body-nul-with-flags",
    ),
    # ListComments
    *_bad_uuid_cases("ListComments", "issue_id", lambda c, v: _list_comments(c, issue_id=v)),
    pytest.param(
        lambda c: _list_comments(c, page_size=-5), "page_size", id="ListComments-size-neg"
    ),
    pytest.param(
        lambda c: _list_comments(c, page_token="garbage"),
        "page_token",
        id="ListComments-token-garbage",
    ),
    pytest.param(
        lambda c: _list_comments(c, issue_id=c.other_issue.id, page_token=c.comments_token),
        "page_token",
        id="ListComments-token-other-issue",
    ),
    # ListActivity
    *_bad_uuid_cases("ListActivity", "company_id", lambda c, v: _list_activity(c, company_id=v)),
    pytest.param(
        lambda c: _list_activity(c, page_size=-1), "page_size", id="ListActivity-size-neg"
    ),
    pytest.param(
        lambda c: _list_activity(c, page_token="garbage"),
        "page_token",
        id="ListActivity-token-garbage",
    ),
    pytest.param(
        lambda c: _list_activity(c, page_token=c.activity_token, action="issue.created"),
        "page_token",
        id="ListActivity-token-other-action",
    ),
    pytest.param(
        lambda c: _list_activity(c, entity_id=c.issue.id),
        "entity_type",
        id="ListActivity-entity_id-without-type",
    ),
    pytest.param(
        lambda c: _list_activity(c, entity_type="e" * 101),
        "entity_type",
        id="ListActivity-entity_type-huge",
    ),
    pytest.param(
        lambda c: _list_activity(c, entity_type="issue", entity_id="i" * 201),
        "entity_id",
        id="ListActivity-entity_id-huge",
    ),
    pytest.param(lambda c: _list_activity(c, action=NUL), "action", id="ListActivity-action-nul"),
    pytest.param(
        lambda c: _list_activity(c, action="a" * 201), "action", id="ListActivity-action-huge"
    ),
    # IssueLockService
    *_bad_uuid_cases("AcquireExecutionLock", "issue_id", lambda c, v: _acquire(c, issue_id=v)),
    *_bad_uuid_cases("AcquireExecutionLock", "run_id", lambda c, v: _acquire(c, run_id=v)),
    *_bad_uuid_cases("AcquireExecutionLock", "agent_id", lambda c, v: _acquire(c, agent_id=v)),
    *_bad_uuid_cases("TransferExecutionLock", "issue_id", lambda c, v: _transfer(c, issue_id=v)),
    *_bad_uuid_cases(
        "TransferExecutionLock", "from_run_id", lambda c, v: _transfer(c, from_run_id=v)
    ),
    *_bad_uuid_cases("TransferExecutionLock", "to_run_id", lambda c, v: _transfer(c, to_run_id=v)),
    *_bad_uuid_cases(
        "ReleaseRunLocks",
        "run_id",
        lambda c, v: c.internal.locks.ReleaseRunLocks(
            issue_locks_pb2.ReleaseRunLocksRequest(run_id=v)
        ),
    ),
    *_bad_uuid_cases(
        "ClearExecutionRunIfTerminal",
        "issue_id",
        lambda c, v: c.internal.locks.ClearExecutionRunIfTerminal(
            issue_locks_pb2.ClearExecutionRunIfTerminalRequest(issue_id=v)
        ),
    ),
    *_bad_uuid_cases("EscalateStrandedIssue", "issue_id", lambda c, v: _escalate(c, issue_id=v)),
    pytest.param(lambda c: _escalate(c, body=""), "body", id="EscalateStrandedIssue-body-empty"),
    pytest.param(
        lambda c: _escalate(c, body=LONG_BODY), "body", id="EscalateStrandedIssue-body-huge"
    ),
    pytest.param(lambda c: _escalate(c, body=NUL), "body", id="EscalateStrandedIssue-body-nul"),
    pytest.param(
        lambda c: _escalate(c, idempotency_key="k" * 201),
        "idempotency_key",
        id="EscalateStrandedIssue-key-huge",
    ),
    pytest.param(
        lambda c: _escalate(c, idempotency_key=NUL),
        "idempotency_key",
        id="EscalateStrandedIssue-key-nul",
    ),
]


@pytest.mark.parametrize(("call", "field"), CASES)
async def test_bad_input_is_invalid_argument(
    suite: Suite, ctx: Ctx, call: Call, field: str
) -> None:
    error = await _refused_unchanged(suite, ctx, call(ctx))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT, (error.code, error.reason, error.message)
    assert error.reason == "INVALID_ARGUMENT"
    fields = [v.field for v in error.violations]
    assert field in fields, (fields, error.message)
    assert all(v.description for v in error.violations)


def _crafted(cursor: Any, **filters: Any) -> str:
    """A page token with the right filter fingerprint but a cursor we never issued.

    The fingerprint is not secret (a digest of the filters), so any client can build one.
    """
    return parse_page(0, "", **filters).next_token({"forged": True} if cursor is None else cursor)


CRAFTED: list[Any] = [
    pytest.param(
        lambda c: _list_issues(
            c, page_token=_crafted({"n": "x"}, company=c.company.id, statuses=[], assignee=None)
        ),
        id="ListIssues-cursor-not-a-number",
    ),
    pytest.param(
        lambda c: _list_issues(
            c, page_token=_crafted(None, company=c.company.id, statuses=[], assignee=None)
        ),
        id="ListIssues-cursor-without-n",
    ),
    pytest.param(
        lambda c: _list_issues(
            c, page_token=_crafted({"n": 10**30}, company=c.company.id, statuses=[], assignee=None)
        ),
        id="ListIssues-cursor-overflow",
    ),
    pytest.param(
        lambda c: _list_activity(
            c,
            page_token=_crafted(
                {"id": "x"}, company=c.company.id, entity_type="", entity_id="", action=""
            ),
        ),
        id="ListActivity-cursor-not-a-number",
    ),
    pytest.param(
        lambda c: _list_activity(
            c,
            page_token=_crafted(
                None, company=c.company.id, entity_type="", entity_id="", action=""
            ),
        ),
        id="ListActivity-cursor-without-id",
    ),
    pytest.param(
        lambda c: _list_comments(
            c,
            page_token=_crafted({"t": "2020-01-01T00:00:00+00:00", "i": "nope"}, issue=c.issue.id),
        ),
        id="ListComments-cursor-bad-id",
    ),
    pytest.param(
        lambda c: _list_comments(
            c, page_token=_crafted({"t": "yesterday", "i": UNKNOWN_ID}, issue=c.issue.id)
        ),
        id="ListComments-cursor-bad-time",
    ),
    pytest.param(
        lambda c: c.board.issues.ListCompanies(
            issues_pb2.ListCompaniesRequest(page_token=_crafted({"t": "yesterday", "i": "nope"}))
        ),
        id="ListCompanies-cursor-garbage",
    ),
]


@pytest.mark.parametrize("call", CRAFTED)
async def test_crafted_page_tokens_are_invalid_argument(suite: Suite, ctx: Ctx, call: Call) -> None:
    """A token that decodes but carries a cursor this service never issued."""
    error = await _refused_unchanged(suite, ctx, call(ctx))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), (
        error.code,
        error.reason,
        error.message,
    )
    assert "page_token" in [v.field for v in error.violations]


NOT_FOUND: list[Any] = [
    pytest.param(
        lambda c: c.board.issues.GetIssue(issues_pb2.GetIssueRequest(issue=UNKNOWN_ID)),
        id="GetIssue-uuid",
    ),
    pytest.param(
        lambda c: c.board.issues.GetIssue(
            issues_pb2.GetIssueRequest(issue=f"{c.company.issue_prefix}-999999")
        ),
        id="GetIssue-identifier",
    ),
    pytest.param(
        lambda c: c.board.issues.GetIssue(issues_pb2.GetIssueRequest(issue="ZZ-" + "9" * 18)),
        id="GetIssue-identifier-18-digits",
    ),
    pytest.param(
        lambda c: c.board.issues.UpdateIssue(
            issues_pb2.UpdateIssueRequest(
                issue=issues_pb2.Issue(id=UNKNOWN_ID, title="x"), update_mask=_mask("title")
            )
        ),
        id="UpdateIssue",
    ),
    pytest.param(lambda c: _checkout(c, issue_id=UNKNOWN_ID), id="CheckoutIssue"),
    pytest.param(
        lambda c: c.board.issues.ReleaseIssue(issues_pb2.ReleaseIssueRequest(issue_id=UNKNOWN_ID)),
        id="ReleaseIssue",
    ),
    pytest.param(
        lambda c: c.board.issues.ForceReleaseIssue(
            issues_pb2.ForceReleaseIssueRequest(issue_id=UNKNOWN_ID)
        ),
        id="ForceReleaseIssue",
    ),
    pytest.param(lambda c: _comment(c, issue_id=UNKNOWN_ID), id="AddComment"),
    pytest.param(lambda c: _list_comments(c, issue_id=UNKNOWN_ID), id="ListComments"),
    pytest.param(lambda c: _acquire(c, issue_id=UNKNOWN_ID), id="AcquireExecutionLock"),
    pytest.param(lambda c: _transfer(c, issue_id=UNKNOWN_ID), id="TransferExecutionLock"),
    pytest.param(
        lambda c: c.internal.locks.ClearExecutionRunIfTerminal(
            issue_locks_pb2.ClearExecutionRunIfTerminalRequest(issue_id=UNKNOWN_ID)
        ),
        id="ClearExecutionRunIfTerminal",
    ),
    pytest.param(lambda c: _escalate(c, issue_id=UNKNOWN_ID), id="EscalateStrandedIssue"),
]


@pytest.mark.parametrize("call", NOT_FOUND)
async def test_unknown_issue_is_not_found(suite: Suite, ctx: Ctx, call: Call) -> None:
    error = await _refused_unchanged(suite, ctx, call(ctx))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "ISSUE_NOT_FOUND"), (
        error.code,
        error.reason,
        error.message,
    )


async def test_unknown_company_is_not_found(suite: Suite, ctx: Ctx) -> None:
    error = await _refused_unchanged(
        suite, ctx, ctx.board.issues.GetCompany(issues_pb2.GetCompanyRequest(company_id=UNKNOWN_ID))
    )
    assert error.code is grpc.StatusCode.NOT_FOUND
    error = await _refused_unchanged(suite, ctx, _create(ctx, company_id=UNKNOWN_ID))
    assert error.code is grpc.StatusCode.NOT_FOUND


ODD_IDS = [
    "{" + UNKNOWN_ID + "}",
    "urn:uuid:" + UNKNOWN_ID,
    UNKNOWN_ID.upper(),
    UNKNOWN_ID.replace("-", ""),
    " " + UNKNOWN_ID,
    "\u00e9" * 36,
    "\U0001f600",
    "PAP-0",
    "pap-1",
    "1" * 100,
    "'; DROP TABLE issues.issues; --",
    "%s",
    ":id",
]


@pytest.mark.parametrize("value", ODD_IDS)
async def test_odd_ids_never_fail_internally(suite: Suite, ctx: Ctx, value: str) -> None:
    """Odd but printable ids are either accepted (then not found) or refused cleanly."""
    calls: list[Awaitable[Any]] = [
        ctx.board.issues.GetIssue(issues_pb2.GetIssueRequest(issue=value)),
        ctx.board.issues.GetCompany(issues_pb2.GetCompanyRequest(company_id=value)),
        _list_issues(ctx, company_id=value),
        _list_issues(ctx, assignee_agent_id=value),
        _update(ctx, ("title",), id=value, title="x"),
        _checkout(ctx, issue_id=value),
        _comment(ctx, issue_id=value),
        _list_comments(ctx, issue_id=value),
        _list_activity(ctx, entity_type="issue", entity_id=value),
        _list_activity(ctx, action=value),
        ctx.board.issues.ForceReleaseIssue(issues_pb2.ForceReleaseIssueRequest(issue_id=value)),
        _acquire(ctx, issue_id=value),
        _transfer(ctx, from_run_id=value),
        ctx.internal.locks.ReleaseRunLocks(issue_locks_pb2.ReleaseRunLocksRequest(run_id=value)),
    ]
    before = await _counts(suite, ctx.company.id)
    for call in calls:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            assert exc.code() not in NEVER, (value, exc.code(), exc.details())
    assert await _counts(suite, ctx.company.id) == before


# ---------------------------------------------------------------------------- pagination


async def _create_many(board: Clients, company_id: str, count: int) -> None:
    for start in range(0, count, 100):
        await asyncio.gather(
            *(
                board.issues.CreateIssue(
                    issues_pb2.CreateIssueRequest(company_id=company_id, title=f"Issue {n}")
                )
                for n in range(start, min(count, start + 100))
            )
        )


async def test_list_issues_pages(suite: Suite) -> None:
    board = suite.clients(admin())
    company = await new_company(board, "Pages Co")
    await _create_many(board, company.id, 120)

    pages: list[issues_pb2.ListIssuesResponse] = []
    token = ""
    while True:
        page = await board.issues.ListIssues(
            issues_pb2.ListIssuesRequest(company_id=company.id, page_size=50, page_token=token)
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
        assert len(pages) < 10, "pagination does not end"
    assert [len(p.issues) for p in pages] == [50, 50, 20]
    assert pages[-1].next_page_token == ""
    listed = [i for p in pages for i in p.issues]
    assert len({i.id for i in listed}) == 120
    assert [i.issue_number for i in listed] == list(range(1, 121))
    assert [i.identifier for i in listed] == [f"{company.issue_prefix}-{n}" for n in range(1, 121)]

    default = await board.issues.ListIssues(
        issues_pb2.ListIssuesRequest(company_id=company.id, page_size=0)
    )
    assert len(default.issues) == 50 and default.next_page_token
    assert [i.id for i in default.issues] == [i.id for i in listed[:50]]
    huge = await board.issues.ListIssues(
        issues_pb2.ListIssuesRequest(company_id=company.id, page_size=10_000)
    )
    assert len(huge.issues) == 120 and huge.next_page_token == ""

    # Filters keep paging consistent: every status filter page is a slice of the whole.
    todo = await board.issues.ListIssues(
        issues_pb2.ListIssuesRequest(company_id=company.id, statuses=[TODO], page_size=50)
    )
    assert list(todo.issues) == [] and todo.next_page_token == ""


async def test_page_size_is_coerced_to_500(suite: Suite) -> None:
    board = suite.clients(admin())
    company = await new_company(board, "Big Co")
    await _create_many(board, company.id, 501)
    for size in (501, 10_000, 2**31 - 1):
        page = await board.issues.ListIssues(
            issues_pb2.ListIssuesRequest(company_id=company.id, page_size=size)
        )
        assert len(page.issues) == 500, size
        assert page.next_page_token
        rest = await board.issues.ListIssues(
            issues_pb2.ListIssuesRequest(
                company_id=company.id, page_size=size, page_token=page.next_page_token
            )
        )
        assert [i.issue_number for i in rest.issues] == [501]
        assert rest.next_page_token == ""


async def test_list_comments_pages(suite: Suite, ctx: Ctx) -> None:
    issue = await ctx.board.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=ctx.company.id, title="Chatty")
    )
    for n in range(5):
        await ctx.board.issues.AddComment(
            issues_pb2.AddCommentRequest(issue_id=issue.id, body=f"c{n}")
        )
    bodies: list[str] = []
    token = ""
    for _ in range(3):
        page = await ctx.board.issues.ListComments(
            issues_pb2.ListCommentsRequest(issue_id=issue.id, page_size=2, page_token=token)
        )
        bodies += [c.body for c in page.comments]
        token = page.next_page_token
    assert bodies == [f"c{n}" for n in range(5)]
    assert token == ""


async def test_list_activity_pages(suite: Suite, ctx: Ctx) -> None:
    total = (await _counts(suite, ctx.company.id))["audit.activity_log"]
    ids: list[str] = []
    token = ""
    while True:
        page = await ctx.board.issues.ListActivity(
            issues_pb2.ListActivityRequest(company_id=ctx.company.id, page_size=3, page_token=token)
        )
        ids += [e.id for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert len(ids) == len(set(ids)) == total
    assert [int(i) for i in ids] == sorted((int(i) for i in ids), reverse=True)


async def test_list_companies_pages(suite: Suite, ctx: Ctx) -> None:
    for n in range(3):
        await new_company(ctx.board, f"Listed {n}")
    seen: list[str] = []
    token = ""
    for _ in range(3):
        page = await ctx.board.issues.ListCompanies(
            issues_pb2.ListCompaniesRequest(page_size=1, page_token=token)
        )
        assert len(page.companies) == 1 and page.next_page_token
        seen += [c.id for c in page.companies]
        token = page.next_page_token
    assert len(set(seen)) == 3
