"""Comment wakes with real agent processes, and ``IssueLockService.ReopenIssue``.

The session's issue and run services and runner; comments go through ``AddComment``
(as the board, or as an agent inside its run), the outbox is consumed by calling
``outbox.consume_once`` (the session runs no consumer), and agents are *gated*: a run
waits until the test creates its gate file, so a test decides when run 1 ends. A run
started once the gate exists ends at once.

C22, C23 and C28 (the wake decisions alone) are in ``test_wakes.py``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from common.actor import Role
from common.db import Database
from common.sql import Row, sql
from paperclip.issues.v1 import issue_locks_pb2, issues_pb2
from paperclip.runs.v1 import runs_pb2
from run_service import finalize, outbox, wakes
from run_service.runner import Runner
from tests.harness import Clients, Suite, admin, agent, board, expect_error, new_company, service
from tests.run_service.support import audit_rows
from tests.run_service.test_outbox import set_cursor
from tests.run_service.test_runner import (
    TERMINAL,
    create_agent,
    issue_row,
    queue_run,
    run_events,
    run_row,
    wait_for,
)

TODO = issues_pb2.ISSUE_STATUS_TODO
DONE = issues_pb2.ISSUE_STATUS_DONE

_GATE_CODE = (
    "import os, sys, time\n"
    "while not os.path.exists(sys.argv[1]):\n"
    "    time.sleep(0.05)\n"
    "print('gate open', flush=True)\n"
)


class World:
    """One dispatched company: its board clients, a gate file, the database."""

    def __init__(self, suite: Suite, company_id: str, gate: Path) -> None:
        self.suite = suite
        self.db = suite.db
        self.company = company_id
        self.owner = suite.clients(board(company_id, Role.ADMIN, user_id="owner"))
        self.gate = gate

    async def gated_agent(self) -> str:
        """An agent whose runs wait for the gate file, then exit 0."""
        command = [sys.executable, "-c", _GATE_CODE, str(self.gate)]
        return await create_agent(self.owner, self.company, command)

    def open_gate(self) -> None:
        self.gate.touch()

    def as_agent(self, agent_id: str, run_id: str) -> Clients:
        return self.suite.clients(agent(agent_id, self.company, run_id))

    async def issue(self, assignee: str | None) -> str:
        created = await self.owner.issues.CreateIssue(
            issues_pb2.CreateIssueRequest(
                company_id=self.company,
                title="comment wakes",
                status=TODO,
                assignee_agent_id=assignee or "",
            )
        )
        return created.id

    async def comment(self, issue_id: str, body: str, clients: Clients | None = None) -> str:
        added = await (clients or self.owner).issues.AddComment(
            issues_pb2.AddCommentRequest(issue_id=issue_id, body=body)
        )
        return added.id

    async def set_status(
        self,
        issue_id: str,
        status: issues_pb2.IssueStatus.ValueType,
        clients: Clients | None = None,
    ) -> None:
        await (clients or self.owner).issues.UpdateIssue(
            issues_pb2.UpdateIssueRequest(
                issue=issues_pb2.Issue(id=issue_id, status=status),
                update_mask=FieldMask(paths=["status"]),
            )
        )


@pytest.fixture
async def world(runner: Runner, suite: Suite, tmp_path: Path) -> AsyncIterator[World]:
    """A fresh company dispatched by the session's runner; the outbox cursor after every
    event written so far (other tests' events make no wakes here)."""
    company = (await new_company(suite.clients(admin()))).id
    assert runner.companies is not None
    runner.companies.add(company)
    the_world = World(suite, company, tmp_path / "gate")
    try:
        yield the_world
    finally:
        the_world.open_gate()  # nothing of ours waits forever
        runner.companies.discard(company)


@pytest.fixture(autouse=True)
def no_lookback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer does not re-scan events behind the cursor (other tests' events)."""
    monkeypatch.setattr(outbox, "LOOKBACK_IDS", 0)


async def until(check: Callable[[], Awaitable[Any]], what: str, *, within: float = 20.0) -> Any:
    """The first truthy result of ``check``, polled every 50 ms."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def fetch(db: Database, query: str, **params: Any) -> list[Row]:
    async with db.unit_of_work() as tx:
        return await tx.fetch(sql(query), params)


def as_json(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value or {})


async def issue_runs(db: Database, issue_id: str) -> list[Row]:
    return await fetch(
        db,
        "SELECT * FROM runs.heartbeat_runs WHERE issue_id = :i ORDER BY created_at, id",
        i=issue_id,
    )


async def agent_wakes(db: Database, agent_id: str) -> list[Row]:
    return await fetch(
        db,
        "SELECT * FROM runs.wakeup_requests WHERE agent_id = :a ORDER BY requested_at, id",
        a=agent_id,
    )


async def holds_issue(db: Database, issue_id: str, run_id: str) -> bool:
    """Whether ``run_id`` holds the issue's execution lock."""
    return str((await issue_row(db, issue_id))["execution_run_id"]) == run_id


async def policy_of(db: Database, run_id: str) -> dict[str, Any] | None:
    """The run's recorded comment-policy outcome (after the terminal write's follow-ups)."""
    recorded = as_json((await run_row(db, run_id))["context"]).get("commentPolicy")
    return recorded if isinstance(recorded, dict) else None


async def consume(world: World) -> None:
    await outbox.consume_once(world.db)


async def deferred_wake(db: Database, agent_id: str, issue_id: str) -> Row:
    rows = await fetch(
        db,
        """
        SELECT * FROM runs.wakeup_requests
        WHERE agent_id = :a AND issue_id = :i AND status = 'deferred'
        """,
        a=agent_id,
        i=issue_id,
    )
    assert len(rows) == 1, [dict(r) for r in rows]
    return rows[0]


async def promoted_run(db: Database, wake_id: str) -> str:
    """The run queued for a (formerly deferred) wake, once promoted."""

    async def check() -> str | None:
        rows = await fetch(
            db,
            "SELECT run_id FROM runs.wakeup_requests WHERE id = :w AND run_id IS NOT NULL",
            w=wake_id,
        )
        return str(rows[0]["run_id"]) if rows else None

    found: str = await until(check, f"the promotion of wake {wake_id}")
    return found


async def spawned(db: Database, run_id: str) -> None:
    """Once the run's process runs: the issue steps (lock, harness checkout) are done."""

    async def check() -> bool:
        row = await run_row(db, run_id)
        assert row["status"] in ("queued", "running"), dict(row)
        return row["process_pid"] is not None

    await until(check, f"the process of run {run_id}")


async def start_holding(world: World, agent_id: str, issue_id: str, reason: str) -> str:
    """Queue a run of ``agent_id`` on the issue; its id once its process runs (it holds
    the lock, and the harness checkout is done)."""
    await set_cursor(world.db)  # the issue's own creation/assignment events wake nobody
    run_id = await queue_run(
        world.db, company_id=world.company, agent_id=agent_id, issue_id=issue_id, reason=reason
    )
    await spawned(world.db, run_id)
    assert await holds_issue(world.db, issue_id, run_id)
    return run_id


# --- C24 ------------------------------------------------------------------------------


async def test_c24_cancel_run_with_a_deferred_comment_promotes_exactly_that_comment(
    world: World,
) -> None:
    a = await world.gated_agent()
    issue = await world.issue(assignee=a)
    run1 = await start_holding(world, a, issue, "issue_assigned")

    q = await world.comment(issue, "please also handle the edge case")
    await consume(world)
    wake = await deferred_wake(world.db, a, issue)
    assert wake["reason"] == "issue_commented"
    assert len(await issue_runs(world.db, issue)) == 1

    cancelled = await world.owner.runs.CancelRun(
        runs_pb2.CancelRunRequest(run_id=run1, reason="stop it")
    )
    assert cancelled.id == run1
    assert (await wait_for(world.db, run1))["status"] == "cancelled"
    run2 = await promoted_run(world.db, str(wake["id"]))
    assert run2 != run1
    world.open_gate()
    finished = await wait_for(world.db, run2)

    assert finished["status"] == "succeeded"
    assert finished["wake_reason"] == "issue_commented"
    context = as_json(finished["context"])
    assert context["commentIds"] == [q]  # only q: nothing of run 1 carried over
    assert context["latestCommentId"] == q
    assert context["wakeReason"] == "issue_commented" and context["issueId"] == issue
    assert [r["status"] for r in await issue_runs(world.db, issue)] == ["cancelled", "succeeded"]
    promoted = next(w for w in await agent_wakes(world.db, a) if w["id"] == wake["id"])
    assert promoted["status"] == "completed"
    # The comment policy judges succeeded runs only: the cancelled run 1 has no outcome.
    assert await policy_of(world.db, run1) is None


# --- C25 / C26 ------------------------------------------------------------------------


async def test_c25_deferred_board_comment_reopens_an_issue_closed_before_run_one_ended(
    world: World,
) -> None:
    a = await world.gated_agent()
    issue = await world.issue(assignee=a)
    run1 = await start_holding(world, a, issue, "manual")
    assert (await issue_row(world.db, issue))["status"] == "in_progress"  # harness checkout

    c2 = await world.comment(issue, "one more thing, please")
    await consume(world)
    wake = await deferred_wake(world.db, a, issue)
    await world.set_status(issue, DONE)  # the board closes it while run 1 still runs
    closed = await issue_row(world.db, issue)
    assert closed["status"] == "done" and closed["completed_at"] is not None

    world.open_gate()
    assert (await wait_for(world.db, run1))["status"] == "succeeded"
    run2 = await promoted_run(world.db, str(wake["id"]))
    finished = await wait_for(world.db, run2)

    assert finished["status"] == "succeeded"
    context = as_json(finished["context"])
    assert finished["wake_reason"] == "issue_commented" and context["commentIds"] == [c2]
    # Reopened to todo before run 2 was queued; run 2's harness checkout took it.
    messages = [e["message"] for e in await run_events(world.db, run2)]
    assert "issue checked out for the run" in messages
    final = await issue_row(world.db, issue)
    assert (final["status"], final["completed_at"]) == ("in_progress", None)
    reopened = [
        r
        for r in await audit_rows(world.db, issue)
        if r["action"] == "issue.updated" and as_json(r["details"]).get("reopened")
    ]
    assert len(reopened) == 1
    details = as_json(reopened[0]["details"])
    assert (reopened[0]["actor_type"], reopened[0]["actor_id"]) == ("service", "run_service")
    assert (details["reopenedFrom"], details["source"], details["status"]) == (
        "done",
        "deferred_comment",
        "todo",
    )


async def test_c26_deferred_mention_by_an_agent_leaves_the_done_issue_done(
    world: World,
) -> None:
    a = await world.gated_agent()
    b = await world.gated_agent()
    issue = await world.issue(assignee=a)
    run1 = await start_holding(world, a, issue, "manual")
    in_run = world.as_agent(a, run1)

    mention = await world.comment(issue, f"handing over to agent://{b}", clients=in_run)
    await consume(world)
    wake = await deferred_wake(world.db, b, issue)  # a holds the issue
    assert wake["reason"] == "issue_comment_mentioned"
    assert wake["requested_by_actor_type"] == "agent"
    await world.set_status(issue, DONE, clients=in_run)  # run 1 finishes the issue
    completed_at = (await issue_row(world.db, issue))["completed_at"]
    assert completed_at is not None

    world.open_gate()
    assert (await wait_for(world.db, run1))["status"] == "succeeded"
    run_b = await promoted_run(world.db, str(wake["id"]))
    finished = await wait_for(world.db, run_b)

    assert finished["status"] == "succeeded" and str(finished["agent_id"]) == b
    assert finished["wake_reason"] == "issue_comment_mentioned"
    assert as_json(finished["context"])["commentIds"] == [mention]
    final = await issue_row(world.db, issue)
    assert (final["status"], final["completed_at"]) == ("done", completed_at)
    assert str(final["assignee_agent_id"]) == a
    assert not [
        r for r in await audit_rows(world.db, issue) if as_json(r["details"]).get("reopened")
    ]


async def test_reopen_decision_needs_a_user_comment_not_written_by_the_finishing_run(
    world: World,
) -> None:
    """``wakes.reopen_wanted`` on its own: a promoted wake reopens a closed issue only
    for a board user's comment."""
    a = await world.gated_agent()
    issue = await world.issue(assignee=a)
    run1 = await start_holding(world, a, issue, "manual")
    by_agent = await world.comment(issue, "agent notes", clients=world.as_agent(a, run1))
    by_user = await world.comment(issue, "board asks for more")
    await world.set_status(issue, DONE)
    world.open_gate()
    await wait_for(world.db, run1)

    def wake(reason: str, ids: list[str]) -> dict[str, Any]:
        return {
            "issue_id": issue,
            "reason": reason,
            "payload": json.dumps({"commentIds": ids, "wakeReason": reason}),
        }

    other_run = str(uuid.uuid4())
    decide = wakes.reopen_wanted
    assert await decide(world.db, wake("issue_commented", [by_user]), other_run)
    assert await decide(world.db, wake("issue_commented", [by_agent, by_user]), run1)
    assert not await decide(world.db, wake("issue_commented", [by_agent]), other_run)
    assert not await decide(world.db, wake("issue_comment_mentioned", [by_agent]), other_run)
    # every comment from the finishing run: never, even for an explicit reopen
    assert not await decide(world.db, wake("issue_reopened_via_comment", [by_agent]), run1)
    assert await decide(world.db, wake("issue_reopened_via_comment", [by_agent]), other_run)
    assert not await decide(world.db, wake("approval_approved", []), other_run)
    await world.set_status(issue, TODO)
    assert not await decide(world.db, wake("issue_commented", [by_user]), other_run)  # open


# --- C27 / C30: the comment policy ----------------------------------------------------


async def test_c27_assigned_run_without_a_comment_gets_exactly_one_retry(world: World) -> None:
    a = await world.gated_agent()
    issue = await world.issue(assignee=a)
    run1 = await start_holding(world, a, issue, "issue_assigned")
    row = await issue_row(world.db, issue)
    assert str(row["checkout_run_id"]) == str(row["execution_run_id"]) == run1
    assert row["status"] == "in_progress"
    checkout = [
        e
        for e in await run_events(world.db, run1)
        if e["message"] == "issue checked out for the run"
    ]
    assert len(checkout) == 1 and as_json(checkout[0]["payload"])["checkedOutByHarness"] is True
    assert "commentIds" not in as_json((await run_row(world.db, run1))["context"])

    world.open_gate()
    assert (await wait_for(world.db, run1))["status"] == "succeeded"
    first = await until(lambda: policy_of(world.db, run1), "run 1's comment policy")
    assert first["outcome"] == "retry_queued"
    run2 = first["retryRunId"]
    finished = await wait_for(world.db, run2)
    second = await until(lambda: policy_of(world.db, run2), "run 2's comment policy")

    assert finished["status"] == "succeeded"
    assert str(finished["retry_of_run_id"]) == run1
    assert finished["retry_reason"] == finished["wake_reason"] == "missing_issue_comment"
    assert as_json(finished["context"])["retryOfRunId"] == run1
    assert second == {"outcome": "retry_exhausted"}
    # The retry's outcome is written in the transaction that would queue another run.
    assert [r["status"] for r in await issue_runs(world.db, issue)] == ["succeeded"] * 2
    retries = [w for w in await agent_wakes(world.db, a) if w["reason"] == "missing_issue_comment"]
    assert len(retries) == 1 and str(retries[0]["run_id"]) == run2
    comments = await world.owner.issues.ListComments(issues_pb2.ListCommentsRequest(issue_id=issue))
    assert list(comments.comments) == []
    # Repeating the follow-ups decides nothing again (idempotent).
    assert await finalize.apply_comment_policy(world.db, run1) == first
    assert len(await issue_runs(world.db, issue)) == 2


async def test_c30_run_that_commented_satisfies_the_policy(world: World) -> None:
    a = await world.gated_agent()
    issue = await world.issue(assignee=a)
    run1 = await start_holding(world, a, issue, "issue_assigned")
    comment = await world.comment(issue, "progress report", clients=world.as_agent(a, run1))

    world.open_gate()
    assert (await wait_for(world.db, run1))["status"] == "succeeded"
    outcome = await until(lambda: policy_of(world.db, run1), "the comment policy")

    assert outcome == {"outcome": "satisfied", "commentId": comment}
    assert len(await issue_runs(world.db, issue)) == 1
    assert not [w for w in await agent_wakes(world.db, a) if w["reason"] == "missing_issue_comment"]
    comments = await world.owner.issues.ListComments(issues_pb2.ListCommentsRequest(issue_id=issue))
    assert [c.body for c in comments.comments] == ["progress report"]  # no summary comment


async def test_comment_policy_ignores_other_wake_reasons(world: World) -> None:
    a = await world.gated_agent()
    issue = await world.issue(assignee=a)
    run1 = await start_holding(world, a, issue, "manual")
    world.open_gate()
    assert (await wait_for(world.db, run1))["status"] == "succeeded"
    await until(lambda: _lock_free(world.db, issue), "the lock release after run 1", within=10)
    assert await finalize.apply_comment_policy(world.db, run1) is None
    assert await policy_of(world.db, run1) is None
    assert len(await issue_runs(world.db, issue)) == 1


async def _lock_free(db: Database, issue_id: str) -> bool:
    return (await issue_row(db, issue_id))["execution_run_id"] is None


# --- C29 ------------------------------------------------------------------------------


async def test_c29_direct_mention_with_nothing_running_runs_at_once_holding_the_lock(
    world: World,
) -> None:
    """Deliberate difference from the reference: there a mention with no lock runs
    without ever taking execution ownership (``executionRunId`` stays null). Here every
    issue run takes the execution lock (``AcquireExecutionLock``) for as long as it
    runs, mentions included (the issue-4 design: one executing run per issue, so a
    mentioned agent never works on an issue concurrently with its assignee's run). What
    the mention does *not* take is the checkout: no harness checkout, no status change,
    the assignee untouched; the lock is released when the run ends."""
    b = await world.gated_agent()
    issue = await world.issue(assignee=None)
    await set_cursor(world.db)
    await world.comment(issue, f"can you look at this, agent://{b}")
    await consume(world)
    wakes_of_b = await agent_wakes(world.db, b)
    assert [w["reason"] for w in wakes_of_b] == ["issue_comment_mentioned"]
    assert wakes_of_b[0]["status"] in ("queued", "claimed")  # a run at once, not deferred
    run_b = str(wakes_of_b[0]["run_id"])

    await spawned(world.db, run_b)
    assert await holds_issue(world.db, issue, run_b)
    held = await issue_row(world.db, issue)
    assert held["execution_agent_name_key"] is not None
    assert held["checkout_run_id"] is None
    assert (held["status"], held["assignee_agent_id"]) == ("todo", None)

    world.open_gate()
    assert (await wait_for(world.db, run_b))["status"] == "succeeded"
    await until(lambda: _lock_free(world.db, issue), "the lock release")
    final = await issue_row(world.db, issue)
    assert (final["status"], final["checkout_run_id"], final["assignee_agent_id"]) == (
        "todo",
        None,
        None,
    )
    assert [r["status"] for r in await issue_runs(world.db, issue)] == ["succeeded"]
    assert all(r["status"] in TERMINAL for r in await issue_runs(world.db, issue))


# --- IssueLockService.ReopenIssue -----------------------------------------------------


async def _reopen(clients: Clients, issue_id: str, source: str = "") -> Any:
    return await clients.locks.ReopenIssue(
        issue_locks_pb2.ReopenIssueRequest(issue_id=issue_id, source=source)
    )


async def test_reopen_issue_is_a_service_only_compare_and_set(world: World) -> None:
    internal = world.suite.clients(service())
    issue = await world.issue(assignee=None)

    refused = await expect_error(_reopen(world.owner, issue))
    assert (refused.code, refused.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SERVICE_REQUIRED")
    bad = await expect_error(_reopen(internal, "not-a-uuid"))
    assert bad.code is grpc.StatusCode.INVALID_ARGUMENT
    missing = await expect_error(_reopen(internal, str(uuid.uuid4())))
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "ISSUE_NOT_FOUND")

    untouched = await _reopen(internal, issue)  # todo: nothing to do
    assert (untouched.reopened, untouched.reopened_from, untouched.issue.status) == (
        False,
        "",
        TODO,
    )

    await world.set_status(issue, DONE)
    first = await _reopen(internal, issue)
    assert (first.reopened, first.reopened_from, first.issue.status) == (True, "done", TODO)
    assert not first.issue.HasField("completed_at")
    again = await _reopen(internal, issue)
    assert (again.reopened, again.issue.status) == (False, TODO)

    await world.set_status(issue, issues_pb2.ISSUE_STATUS_CANCELLED)
    from_cancelled = await _reopen(internal, issue, source="operator")
    assert (from_cancelled.reopened_from, from_cancelled.issue.status) == ("cancelled", TODO)
    reopened = [
        as_json(r["details"])
        for r in await audit_rows(world.db, issue)
        if as_json(r["details"]).get("reopened")
    ]
    assert [(d["reopenedFrom"], d["source"]) for d in reopened] == [
        ("done", "deferred_comment"),
        ("cancelled", "operator"),
    ]
    events = await fetch(
        world.db,
        "SELECT payload FROM issues.issue_events WHERE issue_id = :i AND type = :t ORDER BY id",
        i=issue,
        t="issue.status_changed",
    )
    assert [as_json(e["payload"])["to"] for e in events][-1] == "todo"
