"""The outbox consumer: issue events become wakes exactly once, never for the writer
itself, with the cursor advanced in the same transaction; events that commit out of id
order are still consumed. Events are written straight into ``issues.issue_events``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from common.database_url import asyncpg_dsn
from common.db import Database
from run_service import outbox
from tests.harness import insert_run
from tests.run_service.test_wakes import rows, runs_of_issue, seed_agent, seed_company, seed_issue


async def add_event(
    db: Database,
    *,
    company: str,
    issue: str,
    type: str,
    target: str | None,
    actor_agent: str | None = None,
    actor_run: str | None = None,
    payload: dict[str, Any] | None = None,
) -> int:
    async with db.transaction() as conn:
        row = await conn.execute(
            text(
                """
                INSERT INTO issues.issue_events
                    (company_id, issue_id, type, actor_type, actor_id, actor_agent_id,
                     actor_run_id, target_agent_id, payload)
                VALUES (:c, :i, :t, :at, :aid, :aa, :ar, :target, CAST(:p AS jsonb))
                RETURNING id
                """
            ),
            {
                "c": company,
                "i": issue,
                "t": type,
                "at": "agent" if actor_agent else "user",
                "aid": actor_agent or "board-user",
                "aa": actor_agent,
                "ar": actor_run,
                "target": target,
                "p": json.dumps(payload or {}),
            },
        )
        return int(row.scalar_one())


async def set_cursor(db: Database, value: int | None = None) -> None:
    """Put the cursor at ``value`` (default: the newest event)."""
    async with db.transaction() as conn:
        await conn.execute(
            text(
                """
                INSERT INTO runs.consumer_cursors (consumer, last_event_id)
                VALUES (:c, COALESCE(:v, (SELECT max(id) FROM issues.issue_events), 0))
                ON CONFLICT (consumer) DO UPDATE SET last_event_id = EXCLUDED.last_event_id
                """
            ),
            {"c": outbox.CONSUMER, "v": value},
        )


async def cursor(db: Database) -> int:
    found = await rows(
        db, "SELECT last_event_id FROM runs.consumer_cursors WHERE consumer = :c", c=outbox.CONSUMER
    )
    return int(found[0]["last_event_id"])


async def event_wakes(db: Database, event_id: int) -> list[dict[str, Any]]:
    return await rows(
        db,
        "SELECT * FROM runs.wakeup_requests WHERE idempotency_key = :k",
        k=f"event:{event_id}",
    )


@pytest.fixture(autouse=True)
async def fresh_cursor(db: Database, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Start after every event other tests wrote, and do not re-scan theirs."""
    await set_cursor(db)
    monkeypatch.setattr(outbox, "LOOKBACK_IDS", 0)
    yield


async def test_assigned_event_makes_one_wake_and_one_queued_run(db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    event = await add_event(db, company=company, issue=issue, type="issue.assigned", target=a)

    await outbox.consume_once(db)

    wakes = await event_wakes(db, event)
    assert len(wakes) == 1
    assert wakes[0]["status"] == "queued"
    assert wakes[0]["reason"] == "issue_assigned"
    assert wakes[0]["source"] == "assignment"
    assert wakes[0]["source_event_id"] == event
    runs = await runs_of_issue(db, issue)
    assert len(runs) == 1
    assert runs[0]["status"] == "queued"
    assert str(runs[0]["agent_id"]) == a
    assert runs[0]["wake_reason"] == "issue_assigned"
    assert await cursor(db) >= event


async def test_same_event_consumed_twice_still_one_wake(db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    event = await add_event(
        db,
        company=company,
        issue=issue,
        type="issue.commented",
        target=a,
        payload={"issueId": issue, "commentId": "c1"},
    )
    await outbox.consume_once(db)
    # As after a crash between the wake and the cursor update: the cursor goes back.
    await set_cursor(db, event - 1)
    await outbox.consume_once(db)

    wakes = await event_wakes(db, event)
    assert len(wakes) == 1
    assert wakes[0]["reason"] == "issue_commented"
    assert len(await runs_of_issue(db, issue)) == 1


async def test_comment_by_the_assignees_own_run_wakes_nobody(db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    run = await insert_run(db, company_id=company, agent_id=a, status="succeeded")
    event = await add_event(
        db,
        company=company,
        issue=issue,
        type="issue.commented",
        target=a,
        actor_agent=a,
        actor_run=run,
        payload={"issueId": issue, "commentId": "mine"},
    )
    await outbox.consume_once(db)
    assert await event_wakes(db, event) == []
    assert await runs_of_issue(db, issue) == []
    assert await cursor(db) >= event


async def test_mention_wakes_the_mentioned_agent(db: Database) -> None:
    company = await seed_company(db)
    writer = await seed_agent(db, company)
    mentioned = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    run = await insert_run(db, company_id=company, agent_id=writer, status="succeeded")
    event = await add_event(
        db,
        company=company,
        issue=issue,
        type="issue.mentioned",
        target=mentioned,
        actor_agent=writer,
        actor_run=run,
        payload={"issueId": issue, "commentId": "m1"},
    )
    await outbox.consume_once(db)
    wakes = await event_wakes(db, event)
    assert len(wakes) == 1
    assert str(wakes[0]["agent_id"]) == mentioned
    assert wakes[0]["requested_by_actor_type"] == "agent"
    assert str(wakes[0]["requested_by_run_id"]) == run
    runs = await runs_of_issue(db, issue)
    assert [str(r["agent_id"]) for r in runs] == [mentioned]
    assert runs[0]["wake_reason"] == "issue_comment_mentioned"


async def test_other_event_types_are_ignored(db: Database) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    for kind in ("issue.checked_out", "issue.released", "issue.interrupt_requested"):
        event = await add_event(db, company=company, issue=issue, type=kind, target=a)
        await outbox.consume_once(db)
        assert await event_wakes(db, event) == []
    assert await cursor(db) >= event
    assert await runs_of_issue(db, issue) == []


async def test_event_committed_out_of_id_order_is_still_consumed(
    db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox, "LOOKBACK_IDS", 50)
    company = await seed_company(db)
    late_agent = await seed_agent(db, company)
    early_agent = await seed_agent(db, company)
    late_issue = await seed_issue(db, company)
    early_issue = await seed_issue(db, company)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        slow = conn.transaction()
        await slow.start()
        late_id = await conn.fetchval(
            """
            INSERT INTO issues.issue_events
                (company_id, issue_id, type, actor_type, actor_id, target_agent_id)
            VALUES ($1, $2, 'issue.assigned', 'user', 'board-user', $3) RETURNING id
            """,
            company,
            late_issue,
            late_agent,
        )
        early = await add_event(
            db, company=company, issue=early_issue, type="issue.assigned", target=early_agent
        )
        assert early > late_id
        await outbox.consume_once(db)
        assert len(await event_wakes(db, early)) == 1
        assert await cursor(db) >= early
        await slow.commit()
    finally:
        await conn.close()

    await outbox.consume_once(db)
    wakes = await event_wakes(db, int(late_id))
    assert len(wakes) == 1
    assert str(wakes[0]["agent_id"]) == late_agent
    assert len(await runs_of_issue(db, late_issue)) == 1


async def test_consume_forever_reacts_to_notify(db: Database, database_url: str) -> None:
    company = await seed_company(db)
    a = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    task = asyncio.create_task(
        outbox.consume_forever(db, asyncpg_dsn(database_url), poll_seconds=30)
    )
    try:
        await asyncio.sleep(0.3)
        event = await add_event(db, company=company, issue=issue, type="issue.assigned", target=a)
        for _ in range(50):
            if await event_wakes(db, event):
                break
            await asyncio.sleep(0.1)
        assert len(await event_wakes(db, event)) == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
