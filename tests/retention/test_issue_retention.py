"""Retention of the outbox (``issues.issue_events``) and the audit log
(``audit.activity_log``): ``issue_service.retention``."""

from __future__ import annotations

import json
import uuid

from common.config import Settings
from common.db import Database
from common.retention import sweep
from issue_service import retention
from run_service import outbox, run_interrupts
from tests.retention import support as s

BATCH = 16


def test_the_outbox_consumers_are_the_run_services_cursors() -> None:
    assert set(retention.CONSUMERS) == {outbox.CONSUMER, run_interrupts.CONSUMER}


async def _events(db: Database, company: str, count: int, *, days_ago: float) -> list[int]:
    return sorted(
        int(i)
        for i in await s.column(
            db,
            """
            INSERT INTO issues.issue_events (company_id, issue_id, type, actor_type, actor_id,
                                             created_at)
            SELECT CAST(:c AS uuid), gen_random_uuid(), 'issue.created', 'system', 'test',
                   now() - CAST(:d AS float8) * interval '1 day'
            FROM generate_series(1, :n)
            RETURNING id
            """,
            c=company,
            d=days_ago,
            n=count,
        )
    )


async def _cursor(db: Database, consumer: str, last: int) -> None:
    await s.scalar(
        db,
        """
        INSERT INTO runs.consumer_cursors (consumer, last_event_id) VALUES (:c, :l)
        ON CONFLICT (consumer) DO UPDATE SET last_event_id = :l
        """,
        c=consumer,
        l=last,
    )


async def _remaining(db: Database, ids: list[int]) -> int:
    return int(
        await s.scalar(db, "SELECT count(*) FROM issues.issue_events WHERE id = ANY(:ids)", ids=ids)
    )


async def test_outbox_rows_every_consumer_passed_go_unread_ones_stay(
    own_db: Database, settings: Settings
) -> None:
    db = own_db
    company = await s.company(db)
    old = await _events(db, company, 120, days_ago=2)
    fresh = await _events(db, company, 10, days_ago=0)
    consumers = [f"test-{uuid.uuid4().hex[:8]}-{name}" for name in ("a", "b")]
    policies = retention.policies(settings, consumers)[:1]

    # One consumer has no cursor yet: it would read from the start, nothing goes.
    await _cursor(db, consumers[0], fresh[-1])
    result = await sweep(db, policies, lock_key="test-outbox", batch=BATCH, pause=0)
    assert result.deleted("issues.issue_events") == 0

    # The slower consumer passed the 100th old event: those go, the unread ones stay.
    await _cursor(db, consumers[1], old[99])
    result = await sweep(db, policies, lock_key="test-outbox", batch=BATCH, pause=0)

    assert result.deleted("issues.issue_events") == 100
    assert result.batches("issues.issue_events") == 100 // BATCH + 1
    assert await _remaining(db, old[:100]) == 0
    assert await _remaining(db, old[100:]) == 20
    # Read by all but younger than the horizon.
    await _cursor(db, consumers[1], fresh[-1])
    result = await sweep(db, policies, lock_key="test-outbox", batch=BATCH, pause=0)
    assert result.deleted("issues.issue_events") == 20
    assert await _remaining(db, fresh) == 10


async def _activity(
    db: Database,
    company: str,
    count: int,
    *,
    entity_type: str,
    entity_id: str | None = None,
    details: dict[str, str] | None = None,
    days_ago: float,
) -> list[int]:
    return sorted(
        int(i)
        for i in await s.column(
            db,
            """
            INSERT INTO audit.activity_log (company_id, actor_type, actor_id, action, entity_type,
                                            entity_id, details, created_at)
            SELECT CAST(:c AS uuid), 'system', 'test', 'test.action', CAST(:t AS text),
                   COALESCE(CAST(:e AS text), gen_random_uuid()::text), CAST(:details AS jsonb),
                   now() - CAST(:d AS float8) * interval '1 day'
            FROM generate_series(1, :n)
            RETURNING id
            """,
            c=company,
            t=entity_type,
            e=entity_id,
            details=json.dumps(details or {}),
            d=days_ago,
            n=count,
        )
    )


async def test_audit_rows_of_entities_gone_go_rows_of_existing_issues_stay(
    own_db: Database, settings: Settings
) -> None:
    db = own_db
    company = await s.company(db)
    issue = await s.issue(db, company)
    agent = await s.agent(db, company)
    run = (await s.runs(db, company, agent, 1))[0]
    # Oldest first, as the log is written.
    of_deleted_issues = await _activity(db, company, 50, entity_type="issue", days_ago=120)
    of_issue = await _activity(db, company, 10, entity_type="issue", entity_id=issue, days_ago=110)
    of_gone_runs = await _activity(db, company, 20, entity_type="run", days_ago=105)
    of_gone_runs_on_issue = await _activity(
        db, company, 10, entity_type="run", details={"issueId": issue}, days_ago=104
    )
    of_existing_run = await _activity(
        db, company, 3, entity_type="run", entity_id=run, days_ago=103
    )
    of_gone_leases = await _activity(db, company, 7, entity_type="environment_lease", days_ago=102)
    of_agents = await _activity(db, company, 5, entity_type="agent", days_ago=101)
    young = await _activity(db, company, 10, entity_type="issue", days_ago=30)

    result = await sweep(
        db, retention.policies(settings)[1:], lock_key="test-activity", batch=BATCH, pause=0
    )

    gone = of_deleted_issues + of_gone_runs + of_gone_leases
    assert result.deleted("audit.activity_log") == len(gone)
    assert result.batches("audit.activity_log") >= len(gone) // BATCH
    kept = of_issue + of_gone_runs_on_issue + of_existing_run + of_agents + young
    remaining = await s.column(
        db,
        "SELECT id FROM audit.activity_log WHERE company_id = :c ORDER BY id",
        c=company,
    )
    assert remaining == sorted(kept)
