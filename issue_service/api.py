"""gRPC entrypoints: proto in, one service function, proto out. No SQL, no rules."""

from __future__ import annotations

from common.db import Database
from common.interceptors import Context
from common.request_context import current_actor
from issue_service import (
    activity,
    checkout,
    comments,
    companies,
    escalation,
    issues,
    locks,
    reopen,
    system_comments,
)
from paperclip.issues.v1 import (
    issue_locks_pb2,
    issue_locks_pb2_grpc,
    issues_pb2,
    issues_pb2_grpc,
)


class IssueServicer(issues_pb2_grpc.IssueServiceServicer):
    """paperclip.issues.v1.IssueService."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def CreateCompany(
        self, request: issues_pb2.CreateCompanyRequest, context: Context
    ) -> issues_pb2.Company:
        return await companies.create_company(
            self.db, current_actor(), name=request.name, issue_prefix=request.issue_prefix
        )

    async def GetCompany(
        self, request: issues_pb2.GetCompanyRequest, context: Context
    ) -> issues_pb2.Company:
        return await companies.get_company(self.db, current_actor(), company_id=request.company_id)

    async def ListCompanies(
        self, request: issues_pb2.ListCompaniesRequest, context: Context
    ) -> issues_pb2.ListCompaniesResponse:
        rows, token = await companies.list_companies(
            self.db, current_actor(), page_size=request.page_size, page_token=request.page_token
        )
        return issues_pb2.ListCompaniesResponse(companies=rows, next_page_token=token)

    async def CreateIssue(
        self, request: issues_pb2.CreateIssueRequest, context: Context
    ) -> issues_pb2.Issue:
        return await issues.create_issue_idempotent(
            self.db,
            current_actor(),
            company_id=request.company_id,
            fields=issues.create_fields(request),
            request_id=request.request_id,
        )

    async def GetIssue(
        self, request: issues_pb2.GetIssueRequest, context: Context
    ) -> issues_pb2.Issue:
        return await issues.get_issue(self.db, current_actor(), issue=request.issue)

    async def ListIssues(
        self, request: issues_pb2.ListIssuesRequest, context: Context
    ) -> issues_pb2.ListIssuesResponse:
        rows, token = await issues.list_issues(
            self.db,
            current_actor(),
            company_id=request.company_id,
            statuses=list(request.statuses),
            assignee_agent_id=request.assignee_agent_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return issues_pb2.ListIssuesResponse(issues=rows, next_page_token=token)

    async def UpdateIssue(
        self, request: issues_pb2.UpdateIssueRequest, context: Context
    ) -> issues_pb2.Issue:
        fields = issues.update_fields(request.issue, list(request.update_mask.paths))
        return await issues.update_issue(
            self.db, current_actor(), issue_id=request.issue.id, fields=fields
        )

    async def CheckoutIssue(
        self, request: issues_pb2.CheckoutIssueRequest, context: Context
    ) -> issues_pb2.Issue:
        return await checkout.checkout_issue(
            self.db,
            current_actor(),
            issue_id=request.issue_id,
            agent_id=request.agent_id,
            expected_statuses=list(request.expected_statuses),
        )

    async def ReleaseIssue(
        self, request: issues_pb2.ReleaseIssueRequest, context: Context
    ) -> issues_pb2.Issue:
        return await checkout.release_issue(self.db, current_actor(), issue_id=request.issue_id)

    async def ForceReleaseIssue(
        self, request: issues_pb2.ForceReleaseIssueRequest, context: Context
    ) -> issues_pb2.ForceReleaseIssueResponse:
        issue, prev_checkout, prev_execution = await checkout.force_release_issue(
            self.db,
            current_actor(),
            issue_id=request.issue_id,
            clear_assignee=request.clear_assignee,
        )
        return issues_pb2.ForceReleaseIssueResponse(
            issue=issue,
            previous_checkout_run_id=prev_checkout or "",
            previous_execution_run_id=prev_execution or "",
        )

    async def AddComment(
        self, request: issues_pb2.AddCommentRequest, context: Context
    ) -> issues_pb2.Comment:
        return await comments.add_comment(
            self.db,
            current_actor(),
            issue_id=request.issue_id,
            body=request.body,
            flags=comments.CommentFlags(
                reopen=request.reopen, resume=request.resume, interrupt=request.interrupt
            ),
        )

    async def ListComments(
        self, request: issues_pb2.ListCommentsRequest, context: Context
    ) -> issues_pb2.ListCommentsResponse:
        rows, token = await comments.list_comments(
            self.db,
            current_actor(),
            issue_id=request.issue_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return issues_pb2.ListCommentsResponse(comments=rows, next_page_token=token)

    async def ListActivity(
        self, request: issues_pb2.ListActivityRequest, context: Context
    ) -> issues_pb2.ListActivityResponse:
        rows, token = await activity.list_activity(
            self.db,
            current_actor(),
            company_id=request.company_id,
            entity_type=request.entity_type,
            entity_id=request.entity_id,
            action=request.action,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return issues_pb2.ListActivityResponse(entries=rows, next_page_token=token)


class IssueLockServicer(issue_locks_pb2_grpc.IssueLockServiceServicer):
    """paperclip.issues.v1.IssueLockService (internal)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def AcquireExecutionLock(
        self, request: issue_locks_pb2.AcquireExecutionLockRequest, context: Context
    ) -> issue_locks_pb2.AcquireExecutionLockResponse:
        issue, adopted = await locks.acquire_execution_lock(
            self.db,
            current_actor(),
            issue_id=request.issue_id,
            run_id=request.run_id,
            agent_id=request.agent_id,
        )
        return issue_locks_pb2.AcquireExecutionLockResponse(
            issue=issue, adopted_from_run_id=adopted or ""
        )

    async def TransferExecutionLock(
        self, request: issue_locks_pb2.TransferExecutionLockRequest, context: Context
    ) -> issue_locks_pb2.TransferExecutionLockResponse:
        issue = await locks.transfer_execution_lock(
            self.db,
            current_actor(),
            issue_id=request.issue_id,
            from_run_id=request.from_run_id,
            to_run_id=request.to_run_id,
        )
        return issue_locks_pb2.TransferExecutionLockResponse(issue=issue)

    async def ReleaseRunLocks(
        self, request: issue_locks_pb2.ReleaseRunLocksRequest, context: Context
    ) -> issue_locks_pb2.ReleaseRunLocksResponse:
        ids = await locks.release_run_locks(self.db, current_actor(), run_id=request.run_id)
        return issue_locks_pb2.ReleaseRunLocksResponse(issue_ids=ids)

    async def ClearExecutionRunIfTerminal(
        self, request: issue_locks_pb2.ClearExecutionRunIfTerminalRequest, context: Context
    ) -> issue_locks_pb2.ClearExecutionRunIfTerminalResponse:
        cleared = await locks.clear_execution_run_if_terminal(
            self.db, current_actor(), issue_id=request.issue_id
        )
        return issue_locks_pb2.ClearExecutionRunIfTerminalResponse(cleared=cleared)

    async def EscalateStrandedIssue(
        self, request: issue_locks_pb2.EscalateStrandedIssueRequest, context: Context
    ) -> issue_locks_pb2.EscalateStrandedIssueResponse:
        issue, comment, escalated = await escalation.escalate_stranded_issue(
            self.db,
            current_actor(),
            issue_id=request.issue_id,
            body=request.body,
            idempotency_key=request.idempotency_key,
        )
        return issue_locks_pb2.EscalateStrandedIssueResponse(
            issue=issue, comment=comment, escalated=escalated
        )

    async def AddSystemComment(
        self, request: issue_locks_pb2.AddSystemCommentRequest, context: Context
    ) -> issue_locks_pb2.AddSystemCommentResponse:
        comment = await system_comments.add_system_comment(
            self.db,
            current_actor(),
            issue_id=request.issue_id,
            body=request.body,
            idempotency_key=request.idempotency_key,
            source=request.source,
        )
        return issue_locks_pb2.AddSystemCommentResponse(comment=comment, added=comment is not None)

    async def ReopenIssue(
        self, request: issue_locks_pb2.ReopenIssueRequest, context: Context
    ) -> issue_locks_pb2.ReopenIssueResponse:
        issue, reopened_from = await reopen.reopen_issue(
            self.db, current_actor(), issue_id=request.issue_id, source=request.source
        )
        return issue_locks_pb2.ReopenIssueResponse(
            issue=issue,
            reopened=reopened_from is not None,
            reopened_from=reopened_from.value if reopened_from is not None else "",
        )
