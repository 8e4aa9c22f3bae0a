"""Helpers shared by the issue-service scenario tests (test_scenarios_locks.py,
test_scenarios_comments.py and test_lock_service.py): a fresh company with agents, issues
seeded in an exact state, and readers of the issue row, audit and outbox rows."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import field_mask_pb2
from sqlalchemy import text

from common.actor import Actor, ActorType, Role
from issue_service.model import Status
from paperclip.issues.v1 import issues_pb2
from tests.harness import Clients, Suite, admin, agent, board, insert_run, new_agent, new_company


def pb_status(name: str) -> issues_pb2.IssueStatus.ValueType:
    """The proto enum value of a status name such as ``in_progress``."""
    return Status(name).to_proto()


@dataclass
class World:
    """One fresh company with three agents (a, b, c) and a board admin client."""

    suite: Suite
    board: Clients
    company_id: str
    a: str
    b: str
    c: str
    names: dict[str, str] = field(default_factory=dict)

    @property
    def db(self) -> Any:
        return self.suite.db

    def as_agent(self, agent_id: str, run_id: str | None) -> Clients:
        return self.suite.clients(agent(agent_id, self.company_id, run_id))

    def as_board(self, role: Role = Role.ADMIN, *, run_id: str | None = None) -> Clients:
        if run_id is None:
            return self.suite.clients(board(self.company_id, role))
        return self.suite.clients(
            Actor(
                type=ActorType.BOARD,
                user_id="board-user",
                run_id=run_id,
                memberships={self.company_id: role},
            )
        )

    async def run(self, agent_id: str, status: str = "running") -> str:
        return await insert_run(
            self.db, company_id=self.company_id, agent_id=agent_id, status=status
        )

    async def issue(
        self,
        *,
        status: str = "todo",
        assignee: str | None = None,
        user_assignee: str | None = None,
        checkout: str | None = None,
        execution: str | None = None,
        title: str = "Work",
        blocked_by: tuple[str, ...] = (),
    ) -> str:
        """An issue in exactly this state; the execution lock is a minute old."""
        created = await self.board.issues.CreateIssue(
            issues_pb2.CreateIssueRequest(
                company_id=self.company_id, title=title, blocked_by_issue_ids=list(blocked_by)
            )
        )
        async with self.db.transaction() as conn:
            await conn.execute(
                text(
                    """
                UPDATE issues.issues SET status = :status, assignee_agent_id = :assignee,
                    assignee_user_id = :user, checkout_run_id = :checkout,
                    execution_run_id = :execution,
                    execution_locked_at = CASE WHEN CAST(:execution AS uuid) IS NULL THEN NULL
                                               ELSE now() - interval '1 minute' END,
                    execution_agent_name_key = (
                        SELECT a.name_key FROM runs.heartbeat_runs r
                        JOIN runs.agents a ON a.id = r.agent_id
                        WHERE r.id = CAST(:execution AS uuid)),
                    started_at = CASE WHEN :status = 'in_progress' THEN now() END,
                    completed_at = CASE WHEN :status = 'done' THEN now() END,
                    cancelled_at = CASE WHEN :status = 'cancelled' THEN now() END
                WHERE id = :id
                """
                ),
                {
                    "id": created.id,
                    "status": status,
                    "assignee": assignee,
                    "user": user_assignee,
                    "checkout": checkout,
                    "execution": execution,
                },
            )
        return created.id


async def make_world(suite: Suite) -> World:
    board_clients = suite.clients(admin())
    company = await new_company(board_clients)
    names: dict[str, str] = {}
    ids: list[str] = []
    for letter in "abc":
        bot = await new_agent(board_clients, company.id, name=f"{letter}-{uuid.uuid4().hex[:8]}")
        names[bot.id] = bot.name.lower()
        ids.append(bot.id)
    return World(suite, board_clients, company.id, ids[0], ids[1], ids[2], names)


async def _rows(db: Any, sql: str, **params: Any) -> list[dict[str, Any]]:
    async with db.transaction() as conn:
        result = await conn.execute(text(sql), params)
        return [dict(r) for r in result.mappings()]


async def state(db: Any, issue_id: str) -> dict[str, Any]:
    """The issue row's ownership columns (ids as strings)."""
    rows = await _rows(
        db,
        """
        SELECT status, title, assignee_agent_id::text AS assignee_agent_id, assignee_user_id,
               checkout_run_id::text AS checkout_run_id,
               execution_run_id::text AS execution_run_id, execution_locked_at,
               execution_agent_name_key, started_at, completed_at, cancelled_at
        FROM issues.issues WHERE id = :id""",
        id=issue_id,
    )
    return rows[0]


async def audit(db: Any, issue_id: str, action: str | None = None) -> list[dict[str, Any]]:
    """Audit rows about the issue (optionally one action), oldest first."""
    return await _rows(
        db,
        """
        SELECT action, actor_type, actor_id, agent_id::text AS agent_id,
               run_id::text AS run_id, details
        FROM audit.activity_log
        WHERE entity_type = 'issue' AND entity_id = :id
          AND (CAST(:action AS text) IS NULL OR action = :action)
        ORDER BY id""",
        id=issue_id,
        action=action,
    )


async def events(db: Any, issue_id: str, type_: str | None = None) -> list[dict[str, Any]]:
    """Outbox rows (wakes and run-service requests) of the issue, oldest first."""
    return await _rows(
        db,
        """
        SELECT type, actor_type, actor_id, actor_agent_id::text AS actor_agent_id,
               actor_run_id::text AS actor_run_id, target_agent_id::text AS target_agent_id,
               payload
        FROM issues.issue_events
        WHERE issue_id = :id AND (CAST(:type AS text) IS NULL OR type = :type)
        ORDER BY id""",
        id=issue_id,
        type=type_,
    )


async def comment_count(db: Any, issue_id: str) -> int:
    rows = await _rows(
        db, "SELECT count(*) AS n FROM issues.issue_comments WHERE issue_id = :id", id=issue_id
    )
    return int(rows[0]["n"])


def assert_locks(row: dict[str, Any], run_id: str | None) -> None:
    """Checkout and execution are both ``run_id`` (None: all lock columns cleared)."""
    assert row["checkout_run_id"] == run_id
    assert row["execution_run_id"] == run_id
    if run_id is None:
        assert row["execution_locked_at"] is None
        assert row["execution_agent_name_key"] is None
    else:
        assert row["execution_locked_at"] is not None


async def update(clients: Clients, issue_id: str, **fields: Any) -> issues_pb2.Issue:
    """UpdateIssue with a mask of exactly the given fields."""
    return await clients.issues.UpdateIssue(
        issues_pb2.UpdateIssueRequest(
            issue=issues_pb2.Issue(id=issue_id, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
        )
    )


async def checkout(
    clients: Clients, issue_id: str, agent_id: str, *statuses: str
) -> issues_pb2.Issue:
    return await clients.issues.CheckoutIssue(
        issues_pb2.CheckoutIssueRequest(
            issue_id=issue_id, agent_id=agent_id, expected_statuses=[pb_status(s) for s in statuses]
        )
    )


async def release(clients: Clients, issue_id: str) -> issues_pb2.Issue:
    return await clients.issues.ReleaseIssue(issues_pb2.ReleaseIssueRequest(issue_id=issue_id))


async def force_release(
    clients: Clients, issue_id: str, *, clear_assignee: bool = False
) -> issues_pb2.ForceReleaseIssueResponse:
    return await clients.issues.ForceReleaseIssue(
        issues_pb2.ForceReleaseIssueRequest(issue_id=issue_id, clear_assignee=clear_assignee)
    )


async def comment(
    clients: Clients, issue_id: str, body: str = "note", **flags: bool
) -> issues_pb2.Comment:
    return await clients.issues.AddComment(
        issues_pb2.AddCommentRequest(issue_id=issue_id, body=body, **flags)
    )
