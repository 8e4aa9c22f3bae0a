"""The run service's client of the issue service: execution locks and harness checkout.

Every call is signed with the internal key. Lock calls act as the ``run_service``
service actor; the harness checkout acts as the *agent* inside its run, which is how the
issue service knows the run (not a board user) checked the issue out.

All calls are idempotent compare-and-set operations (docs/architecture.md, "Cross-service
calls"), so repeating one is always safe. ``ReleaseRunLocks`` is retried with backoff
until it is acknowledged; only a shutdown of the run service gives up early (the issue
service's stale-lock sweep converges then). A refusal raises the issue service's own
exception (``common.errors``, with its reason and metadata; see ``common.channels``).
"""

from __future__ import annotations

import asyncio
import logging

import grpc.aio

from common.actor import Actor, ActorType, service_actor, sign_actor
from common.channels import backend_channel, service_methods
from common.config import Settings
from paperclip.issues.v1 import (
    issue_locks_pb2,
    issue_locks_pb2_grpc,
    issues_pb2,
    issues_pb2_grpc,
)
from run_service.acknowledged_call import until_acknowledged

logger = logging.getLogger(__name__)

SERVICE_NAME = "run_service"
#: Every lock call is a compare-and-set and CheckoutIssue is idempotent for the same run:
#: all are retried on UNAVAILABLE by the channel (another replica answers).
IDEMPOTENT_METHODS = service_methods("paperclip.issues.v1.IssueLockService") | {
    "paperclip.issues.v1.IssueService/CheckoutIssue"
}
#: Deadline of one call to the issue service.
CALL_TIMEOUT_SECONDS = 10.0


class IssueClient:
    """Calls ``IssueLockService`` and ``IssueService.CheckoutIssue`` at
    ``settings.issue_service_addr``. Create and use it inside the event loop."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._locks: issue_locks_pb2_grpc.IssueLockServiceAsyncStub | None = None
        self._issues: issues_pb2_grpc.IssueServiceAsyncStub | None = None
        self._closing = asyncio.Event()

    def _stubs(
        self,
    ) -> tuple[
        issue_locks_pb2_grpc.IssueLockServiceAsyncStub, issues_pb2_grpc.IssueServiceAsyncStub
    ]:
        if self._channel is None:
            self._channel = backend_channel(
                self._settings.issue_service_addr,
                idempotent_methods=IDEMPOTENT_METHODS,
                setting="PAPERCLIP_ISSUE_SERVICE_ADDR",
            )
            self._locks = issue_locks_pb2_grpc.IssueLockServiceStub(self._channel)
            self._issues = issues_pb2_grpc.IssueServiceStub(self._channel)
        assert self._locks is not None and self._issues is not None
        return self._locks, self._issues

    def _metadata(self, actor: Actor | None = None) -> tuple[tuple[str, str], ...]:
        return sign_actor(actor or service_actor(SERVICE_NAME), self._settings.internal_key)

    async def acquire_execution_lock(
        self, *, issue_id: str, run_id: str, agent_id: str
    ) -> issues_pb2.Issue:
        """The issue, locked for ``run_id``; raises ``FailedPrecondition``
        (``ISSUE_EXECUTION_LOCKED``) while another live run holds it."""
        locks, _ = self._stubs()
        reply = await locks.AcquireExecutionLock(
            issue_locks_pb2.AcquireExecutionLockRequest(
                issue_id=issue_id, run_id=run_id, agent_id=agent_id
            ),
            metadata=self._metadata(),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return reply.issue

    async def checkout_issue(
        self, *, issue_id: str, agent_id: str, company_id: str, run_id: str
    ) -> issues_pb2.Issue:
        """Check the issue out for the run, as the agent acting inside it (harness
        auto-checkout); raises ``PaperclipError`` on a conflict."""
        _, issues = self._stubs()
        actor = Actor(type=ActorType.AGENT, agent_id=agent_id, company_id=company_id, run_id=run_id)
        return await issues.CheckoutIssue(
            issues_pb2.CheckoutIssueRequest(
                issue_id=issue_id,
                agent_id=agent_id,
                expected_statuses=[
                    issues_pb2.ISSUE_STATUS_TODO,
                    issues_pb2.ISSUE_STATUS_BACKLOG,
                    issues_pb2.ISSUE_STATUS_BLOCKED,
                ],
            ),
            metadata=self._metadata(actor),
            timeout=CALL_TIMEOUT_SECONDS,
        )

    async def transfer_execution_lock(
        self, *, issue_id: str, from_run_id: str, to_run_id: str
    ) -> issues_pb2.Issue:
        """Move the issue's locks from ``from_run_id`` to ``to_run_id`` (a process-loss
        retry), only while ``from_run_id`` still holds them; raises ``FailedPrecondition``
        (``ISSUE_LOCK_NOT_HELD``) otherwise. Idempotent (a repeat returns the issue)."""
        locks, _ = self._stubs()
        reply = await locks.TransferExecutionLock(
            issue_locks_pb2.TransferExecutionLockRequest(
                issue_id=issue_id, from_run_id=from_run_id, to_run_id=to_run_id
            ),
            metadata=self._metadata(),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return reply.issue

    async def reopen_issue(self, *, issue_id: str, source: str) -> str | None:
        """Move a done or cancelled issue back to todo (compare-and-set, idempotent);
        the status it was reopened from, or None when it was open already."""
        locks, _ = self._stubs()
        reply = await locks.ReopenIssue(
            issue_locks_pb2.ReopenIssueRequest(issue_id=issue_id, source=source),
            metadata=self._metadata(),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return reply.reopened_from if reply.reopened else None

    async def add_system_comment(
        self, *, issue_id: str, body: str, idempotency_key: str, source: str
    ) -> bool:
        """A comment on the issue by the system actor (a notice; it wakes nobody); False
        when ``idempotency_key`` was used before."""
        locks, _ = self._stubs()
        reply = await locks.AddSystemComment(
            issue_locks_pb2.AddSystemCommentRequest(
                issue_id=issue_id, body=body, idempotency_key=idempotency_key, source=source
            ),
            metadata=self._metadata(),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return bool(reply.added)

    async def release_run_locks(self, run_id: str) -> list[str] | None:
        """Clear every lock the (terminal) run holds; the issues it touched.

        Retried with backoff until acknowledged. Returns None only when the client is
        closing (shutdown) or the issue service refuses for good (logged): the issue
        service's stale-lock sweep clears such locks later."""
        locks, _ = self._stubs()

        async def release() -> list[str]:
            reply = await locks.ReleaseRunLocks(
                issue_locks_pb2.ReleaseRunLocksRequest(run_id=run_id),
                metadata=self._metadata(),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            return list(reply.issue_ids)

        return await until_acknowledged(
            release, name="ReleaseRunLocks", run_id=run_id, closing=self._closing
        )

    def closing(self) -> None:
        """Shutdown begins: retry loops make one more attempt at most."""
        self._closing.set()

    async def close(self) -> None:
        """Close the channel (after :meth:`closing` and the last calls)."""
        self._closing.set()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
