"""The wake-loop breaker against a real storm (issue 11, "A loop breaker").

An issue service and a run service run as processes (``PAPERCLIP_WAKE_LOOP_RUNS=3``).
The agent assigned an issue posts, in each run, a comment on it as a board user straight
to the issue service: not its own write, so each comment wakes it again — a storm.
After 3 comment-woken runs the next wake is skipped with ``wake_loop_suspected``, an
audit row and one system comment explain it, and no run follows while nothing happens.
A real board user's comment clears the breaker: the agent runs again (the storm
resumes) until the breaker trips a second time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from common.actor import Role
from common.db import Database
from paperclip.issues.v1 import issues_pb2
from tests.databases import fresh_database
from tests.e2e import service_processes
from tests.e2e.service_processes import ServiceProcesses, rows
from tests.harness import INTERNAL_KEY, Suite, admin, board, new_company
from tests.run_service.test_runner import agent_command, create_agent
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

LOOP_RUNS = 3
MARKER = f"storm-{uuid.uuid4().hex[:10]}"
STORM_REASON = "issue_commented"


@pytest.fixture(scope="module")
async def storm_db_url(server_url: str) -> AsyncIterator[str]:
    async with fresh_database(server_url, "paperclip_storm") as url:
        yield url


@pytest.fixture
def processes(storm_db_url: str, tmp_path: Path) -> Iterator[ServiceProcesses]:
    running = ServiceProcesses(
        storm_db_url,
        tmp_path,
        jwt_secret="storm-test-jwt-secret-0123456789abcdef",
        PAPERCLIP_WAKE_LOOP_RUNS=str(LOOP_RUNS),
    )
    try:
        yield running
    finally:
        running.stop()
        service_processes.kill_agents(MARKER)


async def test_a_wake_storm_is_stopped_and_resumed_by_a_board_comment(
    storm_db_url: str, processes: ServiceProcesses, tmp_path: Path
) -> None:
    db = Database(storm_db_url, pool_size=5, max_overflow=5, name="storm-test")
    issue_child = processes.start("issue_service", "PAPERCLIP_ISSUE_SERVICE_ADDR")
    node = processes.start("run_service", "PAPERCLIP_RUN_SERVICE_ADDR")
    suite = Suite(issue_addr=issue_child.addr, run_addr=node.addr, db=db)
    try:
        company = (await new_company(suite.clients(admin()))).id
        owner = suite.clients(board(company, Role.ADMIN, user_id="owner"))
        agent = await create_agent(
            owner,
            company,
            agent_command("comment_storm.py", MARKER),
            env={
                "STORM_ISSUE_ADDR": issue_child.addr,
                "STORM_KEY": INTERNAL_KEY.decode(),
                "STORM_USER": "storm-helper",
                "STORM_COUNT": str(tmp_path / "storm-count"),
            },
            max_concurrent_runs=1,
        )
        issue = await owner.issues.CreateIssue(
            issues_pb2.CreateIssueRequest(
                company_id=company,
                title="Stormy",
                assignee_agent_id=agent,
                status=issues_pb2.ISSUE_STATUS_TODO,
            )
        )
        storm = Storm(db, agent, issue.id)

        await storm.tripped(1)
        assert await storm.comment_runs() == LOOP_RUNS
        await asyncio.sleep(3)  # nothing happens: the storm stays stopped
        assert await storm.comment_runs() == LOOP_RUNS
        assert not await storm.active()
        notices = await storm.notices()
        assert len(notices) == 1 and "suspected wake loop" in notices[0], notices
        audit = await rows(
            db,
            "SELECT details FROM audit.activity_log WHERE company_id = :c"
            " AND action = 'run.wake_loop_suspected'",
            c=company,
        )
        assert len(audit) == 1 and audit[0]["details"]["runs"] == LOOP_RUNS, audit

        # A real board user's comment clears it: the agent runs again, and so does the
        # storm, until the breaker trips once more.
        await owner.issues.AddComment(
            issues_pb2.AddCommentRequest(issue_id=issue.id, body="keep going, carefully")
        )
        await storm.tripped(2)
        assert await storm.comment_runs() == 2 * LOOP_RUNS
        assert len(await storm.notices()) == 2
    finally:
        await suite.close()
        await db.dispose()


class Storm:
    """Reads of the storm's rows."""

    def __init__(self, db: Database, agent: str, issue: str) -> None:
        self.db, self.agent, self.issue = db, agent, issue

    async def comment_runs(self) -> int:
        found = await rows(
            self.db,
            "SELECT count(*) AS n FROM runs.heartbeat_runs"
            " WHERE agent_id = :a AND issue_id = :i AND wake_reason = :r",
            a=self.agent,
            i=self.issue,
            r=STORM_REASON,
        )
        return int(found[0]["n"])

    async def active(self) -> bool:
        found = await rows(
            self.db,
            "SELECT count(*) AS n FROM runs.heartbeat_runs"
            " WHERE agent_id = :a AND status IN ('queued', 'running')",
            a=self.agent,
        )
        return int(found[0]["n"]) > 0

    async def notices(self) -> list[str]:
        found = await rows(
            self.db,
            "SELECT body FROM issues.issue_comments WHERE issue_id = :i"
            " AND author_type = 'system' ORDER BY created_at",
            i=self.issue,
        )
        return [str(r["body"]) for r in found]

    async def tripped(self, times: int) -> None:
        """Until the breaker tripped ``times`` times, was announced, and the agent's last
        run ended."""

        async def done() -> bool:
            found = await rows(
                self.db,
                """
                SELECT count(*) FILTER (WHERE announced_at IS NOT NULL) AS announced,
                       (SELECT count(*) FROM runs.wakeup_requests
                        WHERE agent_id = :a AND skip_reason = 'wake_loop_suspected') AS skipped
                FROM runs.wake_breakers WHERE agent_id = :a AND issue_id = :i
                """,
                a=self.agent,
                i=self.issue,
            )
            announced, skipped = int(found[0]["announced"]), int(found[0]["skipped"])
            return announced == times and skipped >= times and not await self.active()

        await wait_until(done, within=60, what=f"the breaker tripped {times} time(s)")
