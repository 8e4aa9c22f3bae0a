"""Seeding helpers of the retention tests: rows written straight with SQL, timestamps
set in the past."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text

from common.db import Database
from common.sql import sql
from tests.harness import unique_prefix

TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")


async def scalar(db: Database, statement: str, **params: Any) -> Any:
    async with db.transaction() as conn:
        result = await conn.execute(text(statement), params)
        return result.scalar() if result.returns_rows else None


async def column(db: Database, statement: str, **params: Any) -> list[Any]:
    async with db.transaction() as conn:
        return list((await conn.execute(text(statement), params)).scalars())


async def company(db: Database) -> str:
    return str(
        await scalar(
            db,
            "INSERT INTO issues.companies (name, issue_prefix) VALUES ('Ret', :p) RETURNING id",
            p=unique_prefix(),
        )
    )


async def agent(db: Database, company_id: str) -> str:
    name = f"agent-{uuid.uuid4().hex[:8]}"
    return str(
        await scalar(
            db,
            "INSERT INTO runs.agents (company_id, name, name_key) VALUES (:c, :n, :n) RETURNING id",
            c=company_id,
            n=name,
        )
    )


async def issue(
    db: Database, company_id: str, *, status: str = "todo", assignee: str | None = None
) -> str:
    number = uuid.uuid4().int % 1_000_000_000
    return str(
        await scalar(
            db,
            """
            INSERT INTO issues.issues (company_id, issue_number, identifier, title, status,
                                       assignee_agent_id)
            VALUES (:c, :n, :i, 'Keep it', :s, :a) RETURNING id
            """,
            c=company_id,
            n=number,
            i=f"RET-{number}",
            s=status,
            a=assignee,
        )
    )


async def runs(
    db: Database,
    company_id: str,
    agent_id: str,
    count: int,
    *,
    status: str = "succeeded",
    days_ago: float = 0,
    events: int = 0,
    issue_id: str | None = None,
    retry_of: str | None = None,
) -> list[str]:
    """``count`` runs created, started and (if ``status`` is terminal) finished
    ``days_ago`` days ago, each with ``events`` events of the same age."""
    finished = status in TERMINAL
    ids = await column(
        db,
        """
        INSERT INTO runs.heartbeat_runs (company_id, agent_id, issue_id, status, retry_of_run_id,
                                         created_at, started_at, finished_at, next_event_seq)
        SELECT :c, :a, :i, :s, :retry,
               now() - CAST(:d AS float8) * interval '1 day' - make_interval(secs => g),
               now() - CAST(:d AS float8) * interval '1 day' - make_interval(secs => g),
               CASE WHEN :finished THEN now() - CAST(:d AS float8) * interval '1 day' END,
               :events + 1
        FROM generate_series(1, :n) AS g
        RETURNING id
        """,
        c=company_id,
        a=agent_id,
        i=issue_id,
        s=status,
        retry=retry_of,
        d=days_ago,
        finished=finished,
        events=events,
        n=count,
    )
    if events:
        await scalar(
            db,
            """
            INSERT INTO runs.run_events (run_id, seq, type, message, created_at)
            SELECT r, s, 'stdout', 'line ' || s, now() - CAST(:d AS float8) * interval '1 day'
            FROM unnest(CAST(:runs AS uuid[])) AS r, generate_series(1, :e) AS s
            """,
            runs=ids,
            e=events,
            d=days_ago,
        )
    return [str(i) for i in ids]


async def wakes(
    db: Database,
    company_id: str,
    agent_id: str,
    count: int,
    *,
    status: str,
    days_ago: float,
    run_id: str | None = None,
    issue_id: str | None = None,
) -> list[str]:
    """``count`` wakes requested (and, unless live, finished) ``days_ago`` days ago."""
    ids = await column(
        db,
        """
        INSERT INTO runs.wakeup_requests (company_id, agent_id, source, status, run_id, issue_id,
                                          requested_at, finished_at)
        SELECT :c, :a, 'on_demand', :s, :r, :i, now() - CAST(:d AS float8) * interval '1 day',
               CASE WHEN :s NOT IN ('queued', 'claimed', 'deferred')
                    THEN now() - CAST(:d AS float8) * interval '1 day' END
        FROM generate_series(1, :n)
        RETURNING id
        """,
        c=company_id,
        a=agent_id,
        s=status,
        r=run_id,
        i=issue_id,
        d=days_ago,
        n=count,
    )
    return [str(i) for i in ids]


async def count_in(db: Database, table: str, column_name: str, ids: Sequence[str]) -> int:
    """How many rows of ``table`` have ``column_name`` among ``ids``."""
    async with db.unit_of_work() as tx:
        return int(
            await tx.fetchval(
                sql(f"SELECT count(*) FROM {table} WHERE {column_name} = ANY(:ids::uuid[])"),
                {"ids": list(ids)},
            )
        )


async def workspace(db: Database, company_id: str, *, closed_days_ago: float | None = None) -> str:
    """A workspace, open or closed ``closed_days_ago`` days ago."""
    return str(
        await scalar(
            db,
            """
            INSERT INTO workspaces.execution_workspaces (company_id, name, mode, strategy_type,
                provider_type, status, closed_at)
            VALUES (:c, 'w', 'isolated_workspace', 'project_primary', 'local_fs',
                    CASE WHEN CAST(:closed AS float8) IS NULL THEN 'active' ELSE 'archived' END,
                    now() - CAST(:closed AS float8) * interval '1 day')
            RETURNING id
            """,
            c=company_id,
            closed=closed_days_ago,
        )
    )


async def trip(
    db: Database,
    company: str,
    agent: str,
    issue: str | None,
    *,
    kind: str = "wake_loop",
    days_ago: float,
    announced: bool = True,
) -> str:
    """A trip row of ``days_ago``, its comment posted when ``announced``."""
    return str(
        await scalar(
            db,
            """
            INSERT INTO runs.wake_breakers
                (company_id, agent_id, issue_id, kind, reason, runs, window_seconds,
                 tripped_at, announced_at)
            VALUES (:c, :a, :i, :k, 'issue_commented', 10, 1800,
                    now() - make_interval(days => :d),
                    CASE WHEN :announced THEN now() - make_interval(days => :d) END)
            RETURNING id
            """,
            c=company,
            a=agent,
            i=issue,
            k=kind,
            d=days_ago,
            announced=announced,
        )
    )


async def activity(
    db: Database,
    company: str,
    issue: str,
    *,
    actor: str,
    action: str,
    status: bool,
    days_ago: float,
) -> None:
    """An audit row about ``issue`` of ``days_ago`` (a status change when ``status``)."""
    await scalar(
        db,
        """
        INSERT INTO audit.activity_log
            (company_id, actor_type, actor_id, action, entity_type, entity_id, details,
             created_at)
        VALUES (:c, :actor, 'someone', :action, 'issue', :i,
                CASE WHEN :status THEN '{"status": "in_progress"}'::jsonb
                     ELSE '{}'::jsonb END,
                now() - make_interval(days => :d))
        """,
        c=company,
        actor=actor,
        action=action,
        i=issue,
        status=status,
        d=days_ago,
    )
