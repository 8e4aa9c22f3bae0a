"""One active run per (agent, issue), by constraint: the partial unique index
``heartbeat_runs_one_active_per_agent_issue``, the migration that settles duplicates on
a database made without it, and every run-creating path mapping a violation to the
coalesce/defer behaviour (real PostgreSQL, real concurrent connections)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import asyncpg
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from common.database_url import asyncpg_dsn, normalize_database_url
from common.db import Database
from common.migrate import MIGRATIONS_DIR, migrate
from paperclip.runs.v1 import run_messages_pb2 as pb
from run_service.wakes import ONE_ACTIVE_RUN_INDEX, insert_queued_run, promote_deferred
from tests.databases import fresh_database
from tests.run_service.test_wakes import (
    rows,
    runs_of_issue,
    seed_agent,
    seed_company,
    seed_issue,
    wake,
)

_INSERT_QUEUED = """
    INSERT INTO runs.heartbeat_runs (company_id, agent_id, issue_id, status)
    VALUES ($1, $2, $3, 'queued') RETURNING id
"""


async def test_concurrent_writers_get_one_active_run_per_agent_and_issue(
    db: Database, database_url: str
) -> None:
    """16 connections insert a queued run for one (agent, issue) at once: one wins, the
    others are refused by the index (by name), whatever the interleaving."""
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    connections = [await asyncpg.connect(asyncpg_dsn(database_url)) for _ in range(16)]
    gate = asyncio.Event()

    async def insert(conn: asyncpg.Connection) -> str:
        await gate.wait()
        try:
            await conn.fetchval(_INSERT_QUEUED, company, agent, issue)
        except asyncpg.UniqueViolationError as exc:
            return str(exc.constraint_name)
        return "inserted"

    try:
        tasks = [asyncio.create_task(insert(c)) for c in connections]
        await asyncio.sleep(0.05)
        gate.set()
        outcomes = Counter(await asyncio.gather(*tasks))
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    assert outcomes == {"inserted": 1, ONE_ACTIVE_RUN_INDEX: 15}
    # Another agent on the same issue, and issue-less runs, are not limited by it.
    other = await seed_agent(db, company)
    async with db.unit_of_work() as tx:
        assert (
            await insert_queued_run(
                tx,
                company_id=company,
                agent_id=other,
                issue_id=issue,
                source="on_demand",
                reason="",
                wake_id=str(uuid.uuid4()),
                context={},
            )
            is not None
        )
        for _ in range(2):
            assert (
                await insert_queued_run(
                    tx,
                    company_id=company,
                    agent_id=agent,
                    issue_id=None,
                    source="on_demand",
                    reason="",
                    wake_id=str(uuid.uuid4()),
                    context={},
                )
                is not None
            )
        # A second active run of the pair: the savepoint undoes it and says so.
        assert (
            await insert_queued_run(
                tx,
                company_id=company,
                agent_id=agent,
                issue_id=issue,
                source="on_demand",
                reason="",
                wake_id=str(uuid.uuid4()),
                context={},
            )
            is None
        )


async def test_a_wake_that_loses_the_insert_race_coalesces_into_the_winner(
    db: Database, database_url: str
) -> None:
    """A writer that takes none of the wake locks inserts an active run of the pair and
    holds its transaction open; a wake decides meanwhile (sees no active run), blocks on
    the index, and once the writer commits it is refused, undoes its insert and decides
    again: it coalesces into the writer's run. No second active run exists at any time."""
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    writer = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        transaction = writer.transaction()
        await transaction.start()
        winner = str(await writer.fetchval(_INSERT_QUEUED, company, agent, issue))
        waking = asyncio.create_task(wake(db, agent, issue_id=issue, reason="race"))
        await asyncio.sleep(0.5)
        assert not waking.done(), "the wake did not wait on the uncommitted run"
        await transaction.commit()
        out = await asyncio.wait_for(waking, 10)
    finally:
        await writer.close()
    assert out.wakeup_request.status == pb.WAKEUP_STATUS_COALESCED
    assert out.wakeup_request.run_id == winner
    assert not out.HasField("run")
    assert [str(r["id"]) for r in await runs_of_issue(db, issue)] == [winner]


async def test_promotion_and_wakes_racing_leave_one_active_run(db: Database) -> None:
    """Wakes of the pair, and promotions of its deferred wake, all at once: one active run."""
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    first = await wake(db, agent, issue_id=issue)
    await rows(
        db,
        "UPDATE runs.heartbeat_runs SET status = 'running' WHERE id = :r RETURNING id",
        r=first.run.id,
    )
    deferred = await wake(db, agent, issue_id=issue, reason="approval_approved")
    assert deferred.wakeup_request.status == pb.WAKEUP_STATUS_DEFERRED
    await rows(
        db,
        "UPDATE runs.heartbeat_runs SET status = 'succeeded', finished_at = now()"
        " WHERE id = :r RETURNING id",
        r=first.run.id,
    )
    await asyncio.gather(
        *(promote_deferred(db, issue) for _ in range(5)),
        *(wake(db, agent, issue_id=issue, payload={"i": i}) for i in range(10)),
    )
    active = [r for r in await runs_of_issue(db, issue) if r["status"] in ("queued", "running")]
    assert len(active) == 1, active


async def test_migration_settles_duplicates_then_enforces_the_index(server_url: str) -> None:
    """A database made before the index, holding duplicates: the migration keeps the
    running run (else the oldest queued), cancels the others with a reason and an event,
    coalesces their wakes into the one kept, and then the index refuses a duplicate."""
    async with fresh_database(server_url, "paperclip_one_active") as url:
        await _downgrade(url, "0006")
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await conn.execute(f"DROP INDEX runs.{ONE_ACTIVE_RUN_INDEX}")
            seeded = await _seed_duplicates(conn)
            await migrate(url)
            await _check_settled(conn, seeded)
            with pytest.raises(asyncpg.UniqueViolationError) as refused:
                await conn.fetchval(
                    _INSERT_QUEUED, seeded["company"], seeded["agent"], seeded["issue_a"]
                )
            assert refused.value.constraint_name == ONE_ACTIVE_RUN_INDEX
            head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
            assert await conn.fetchval("SELECT version_num FROM alembic_version") == head
        finally:
            await conn.close()


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


async def _downgrade(url: str, revision: str) -> None:
    """Take the database at ``url`` back to ``revision`` (as a database made then)."""
    engine = create_async_engine(normalize_database_url(url), pool_size=1)
    try:
        async with engine.connect() as conn:

            def downgrade(sync_conn: Connection) -> None:
                config = _alembic_config()
                config.attributes["connection"] = sync_conn
                command.downgrade(config, revision)

            await conn.run_sync(downgrade)
            await conn.commit()
    finally:
        await engine.dispose()


async def _seed_duplicates(conn: asyncpg.Connection) -> dict[str, Any]:
    company = await conn.fetchval(
        "INSERT INTO issues.companies (name, issue_prefix) VALUES ('Dup', 'DUP') RETURNING id"
    )
    agent, other = [
        await conn.fetchval(
            "INSERT INTO runs.agents (company_id, name, name_key) VALUES ($1, $2, $2) RETURNING id",
            company,
            name,
        )
        for name in ("dup-a", "dup-b")
    ]
    issue_a, issue_b = [
        await conn.fetchval(
            "INSERT INTO issues.issues (company_id, issue_number, identifier, title, status)"
            " VALUES ($1, $2, $3, 'dup', 'todo') RETURNING id",
            company,
            n,
            f"DUP-{n}",
        )
        for n in (1, 2)
    ]

    async def run(agent_id: Any, issue_id: Any, status: str, age_s: int) -> Any:
        run_id = await conn.fetchval(
            "INSERT INTO runs.heartbeat_runs (company_id, agent_id, issue_id, status, created_at)"
            " VALUES ($1, $2, $3, $4, now() - make_interval(secs => $5)) RETURNING id",
            company,
            agent_id,
            issue_id,
            status,
            age_s,
        )
        await conn.execute(
            "INSERT INTO runs.wakeup_requests (company_id, agent_id, source, issue_id, status,"
            " run_id) VALUES ($1, $2, 'on_demand', $3, $4, $5)",
            company,
            agent_id,
            issue_id,
            "claimed" if status == "running" else "queued",
            run_id,
        )
        return run_id

    return {
        "company": company,
        "agent": agent,
        "issue_a": issue_a,
        # Pair (agent, A): an old queued run, the running one, a newer queued one.
        "a_old_queued": await run(agent, issue_a, "queued", 300),
        "a_running": await run(agent, issue_a, "running", 200),
        "a_new_queued": await run(agent, issue_a, "queued", 100),
        # Pair (agent, B): two queued runs, the older stays.
        "b_old": await run(agent, issue_b, "queued", 300),
        "b_new": await run(agent, issue_b, "queued", 100),
        # Another agent on A, and a finished run of the pair: untouched.
        "other_on_a": await run(other, issue_a, "queued", 50),
        "a_finished": await run(agent, issue_a, "succeeded", 400),
    }


async def _check_settled(conn: asyncpg.Connection, seeded: dict[str, Any]) -> None:
    names = (
        "a_old_queued",
        "a_running",
        "a_new_queued",
        "b_old",
        "b_new",
        "other_on_a",
        "a_finished",
    )
    found = await conn.fetch(
        "SELECT id, status, error_code FROM runs.heartbeat_runs WHERE id = ANY($1::uuid[])",
        [seeded[name] for name in names],
    )
    by_id = {row["id"]: row for row in found}
    status = {name: by_id[seeded[name]] for name in names}
    kept = {"a_running": "running", "b_old": "queued", "other_on_a": "queued"}
    for name, expected in kept.items():
        assert (status[name]["status"], status[name]["error_code"]) == (expected, None), name
    assert status["a_finished"]["status"] == "succeeded"
    for name, keeper in (
        ("a_old_queued", "a_running"),
        ("a_new_queued", "a_running"),
        ("b_new", "b_old"),
    ):
        assert (status[name]["status"], status[name]["error_code"]) == (
            "cancelled",
            "duplicate_active_run",
        ), name
        wake_row = await conn.fetchrow(
            "SELECT status, run_id FROM runs.wakeup_requests WHERE agent_id = $1 AND run_id = $2",
            seeded["agent"],
            seeded[keeper],
        )
        assert wake_row is not None
        coalesced = await conn.fetchval(
            "SELECT count(*) FROM runs.wakeup_requests WHERE run_id = $1 AND status = 'coalesced'",
            seeded[keeper],
        )
        assert coalesced >= 1, name
        event = await conn.fetchrow(
            "SELECT message, payload->>'keptRunId' AS kept FROM runs.run_events WHERE run_id = $1",
            seeded[name],
        )
        assert event is not None and event["kept"] == str(seeded[keeper]), name
    wakes = await conn.fetch(
        "SELECT status FROM runs.wakeup_requests WHERE company_id = $1", seeded["company"]
    )
    assert Counter(w["status"] for w in wakes) == {"coalesced": 3, "queued": 3, "claimed": 1}
