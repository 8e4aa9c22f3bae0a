"""The run service's reads of the issue service's tables (``run_service.foreign_reads``),
on rows written straight into ``issues.*``."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from common.db import Database
from run_service import foreign_reads, outbox
from tests.harness import insert_run
from tests.run_service.test_outbox import add_event
from tests.run_service.test_wakes import seed_agent, seed_company, seed_issue


async def add_comment(
    db: Database, *, company: str, issue: str, author_type: str, run: str | None = None
) -> str:
    async with db.transaction() as conn:
        row = await conn.execute(
            text(
                """
                INSERT INTO issues.issue_comments
                    (company_id, issue_id, body, author_type, created_by_run_id)
                VALUES (:c, :i, 'a comment', :t, :r) RETURNING id
                """
            ),
            {"c": company, "i": issue, "t": author_type, "r": run},
        )
        return str(row.scalar_one())


async def test_company_and_issue_reads(db: Database) -> None:
    company = await seed_company(db)
    other = await seed_company(db)
    issue = await seed_issue(db, company)
    missing = str(uuid.uuid4())
    async with db.unit_of_work() as tx:
        assert await foreign_reads.company_exists(tx, company)
        assert not await foreign_reads.company_exists(tx, missing)
        assert await foreign_reads.issue_in_company(tx, issue, company)
        assert not await foreign_reads.issue_in_company(tx, issue, other)
        assert not await foreign_reads.issue_in_company(tx, missing, company)
        assert await foreign_reads.issue_status(tx, issue) == "todo"
        assert await foreign_reads.issue_status(tx, missing) is None


async def test_comment_reads(db: Database) -> None:
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    run = await insert_run(db, company_id=company, agent_id=agent, issue_id=issue)
    by_user = await add_comment(db, company=company, issue=issue, author_type="user")
    async with db.unit_of_work() as tx:
        assert await foreign_reads.run_comment_id(tx, issue, run) is None
    first = await add_comment(db, company=company, issue=issue, author_type="agent", run=run)
    await add_comment(db, company=company, issue=issue, author_type="agent", run=run)
    async with db.unit_of_work() as tx:
        assert str(await foreign_reads.run_comment_id(tx, issue, run)) == first
        authors = await foreign_reads.comment_authors(
            tx, issue, [by_user, first, str(uuid.uuid4())]
        )
    assert sorted((a["author_type"], a["created_by_run_id"]) for a in authors) == [
        ("agent", uuid.UUID(run)),
        ("user", None),
    ]


async def test_outbox_event_reads(db: Database) -> None:
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    assigned = await add_event(
        db, company=company, issue=issue, type="issue.assigned", target=agent
    )
    own = await add_event(
        db, company=company, issue=issue, type="issue.commented", target=agent, actor_agent=agent
    )
    released = await add_event(
        db, company=company, issue=issue, type="issue.force_released", target=None
    )
    async with db.unit_of_work() as tx:
        assert await foreign_reads.latest_issue_event_id(tx) >= released
        after = await foreign_reads.issue_events_after(tx, assigned - 1, 2)
        unwoken = await foreign_reads.unwoken_issue_events(
            tx, low=assigned - 1, high=released, types=list(outbox.WAKE_REASONS), limit=10
        )
        interrupts = await foreign_reads.issue_events_of_types(
            tx, low=assigned - 1, high=released, types=["issue.force_released"], limit=10
        )
    assert [e["id"] for e in after] == [assigned, own]
    assert str(after[0]["target_agent_id"]) == agent
    # the agent's own write wakes nobody; the interrupt is not a wake type
    assert [e["id"] for e in unwoken] == [assigned]
    assert [(e["id"], e["type"]) for e in interrupts] == [(released, "issue.force_released")]


async def test_an_event_with_its_wake_is_not_unwoken(db: Database) -> None:
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    event = await add_event(db, company=company, issue=issue, type="issue.assigned", target=agent)
    async with db.transaction() as conn:
        await conn.execute(
            text(
                """
                INSERT INTO runs.wakeup_requests
                    (company_id, agent_id, source, reason, issue_id, status, idempotency_key)
                VALUES (:c, :a, 'assignment', 'issue_assigned', :i, 'skipped', :k)
                """
            ),
            {"c": company, "a": agent, "i": issue, "k": f"event:{event}"},
        )
    async with db.unit_of_work() as tx:
        unwoken = await foreign_reads.unwoken_issue_events(
            tx, low=event - 1, high=event, types=list(outbox.WAKE_REASONS), limit=10
        )
    assert unwoken == []
