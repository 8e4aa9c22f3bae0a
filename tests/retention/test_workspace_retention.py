"""Retention of workspace operations and ended leases (``workspace_service.retention``)."""

from __future__ import annotations

from common.config import Settings
from common.db import Database
from common.retention import sweep
from tests.retention import support as s
from workspace_service import retention

BATCH = 20


async def _operations(
    db: Database,
    company: str,
    workspace: str | None,
    count: int,
    *,
    days_ago: float,
    status: str = "succeeded",
    parent: str | None = None,
) -> list[str]:
    return [
        str(i)
        for i in await s.column(
            db,
            """
            INSERT INTO workspaces.workspace_operations (company_id, workspace_id,
                parent_operation_id, actor_type, actor_id, phase, command, host, status,
                stdout, started_at, finished_at)
            SELECT :c, :w, :p, 'system', 'test', 'workspace_provision', 'true', 'h', :s,
                   repeat('output ', 100), now() - CAST(:d AS float8) * interval '1 day',
                   CASE WHEN :s <> 'running'
                        THEN now() - CAST(:d AS float8) * interval '1 day' END
            FROM generate_series(1, :n)
            RETURNING id
            """,
            c=company,
            w=workspace,
            p=parent,
            s=status,
            d=days_ago,
            n=count,
        )
    ]


async def test_operations_of_closed_workspaces_go_those_of_open_ones_stay(
    own_db: Database, settings: Settings
) -> None:
    db = own_db
    company = await s.company(db)
    open_ws = await s.workspace(db, company)
    closed = await s.workspace(db, company, closed_days_ago=40)
    closed_recently = await s.workspace(db, company, closed_days_ago=10)
    of_open = await _operations(db, company, open_ws, 15, days_ago=60)
    of_closed = await _operations(db, company, closed, 50, days_ago=45)
    parent = await _operations(db, company, closed, 1, days_ago=45)
    children = await _operations(db, company, closed, 3, days_ago=45, parent=parent[0])
    running = await _operations(db, company, closed, 1, days_ago=45, status="running")
    of_recently_closed = await _operations(db, company, closed_recently, 5, days_ago=45)
    of_none = await _operations(db, company, None, 12, days_ago=40)
    young_of_none = await _operations(db, company, None, 2, days_ago=3)

    result = await sweep(
        db, retention.policies(settings)[:1], lock_key="test-ops", batch=BATCH, pause=0
    )

    gone = of_closed + parent + children + of_none
    assert result.deleted("workspaces.workspace_operations") == len(gone)
    assert result.batches("workspaces.workspace_operations") >= len(gone) // BATCH + 1
    assert await s.count_in(db, "workspaces.workspace_operations", "id", gone) == 0
    kept = of_open + running + of_recently_closed + young_of_none
    assert await s.count_in(db, "workspaces.workspace_operations", "id", kept) == len(kept)


async def _leases(
    db: Database, company: str, workspace: str, count: int, *, status: str, days_ago: float
) -> list[str]:
    return [
        str(i)
        for i in await s.column(
            db,
            """
            INSERT INTO workspaces.environment_leases (company_id, environment_id, workspace_id,
                status, holder_type, holder_id, ttl_seconds, expires_at, released_at,
                created_at)
            SELECT :c, gen_random_uuid(), :w, :s, 'agent', 'a', 60,
                   now() - CAST(:d AS float8) * interval '1 day',
                   CASE WHEN :s <> 'active' THEN now() - CAST(:d AS float8) * interval '1 day' END,
                   now() - CAST(:d AS float8) * interval '1 day'
            FROM generate_series(1, :n)
            RETURNING id
            """,
            c=company,
            w=workspace,
            s=status,
            d=days_ago,
            n=count,
        )
    ]


async def test_ended_leases_go_after_their_horizon_active_ones_stay(
    own_db: Database, settings: Settings
) -> None:
    db = own_db
    company = await s.company(db)
    workspace = await s.workspace(db, company)
    released = await _leases(db, company, workspace, 30, status="released", days_ago=10)
    expired = await _leases(db, company, workspace, 15, status="expired", days_ago=8)
    failed = await _leases(db, company, workspace, 5, status="failed", days_ago=30)
    young = await _leases(db, company, workspace, 4, status="released", days_ago=2)
    active = await _leases(db, company, workspace, 1, status="active", days_ago=40)

    result = await sweep(
        db, retention.policies(settings)[1:], lock_key="test-leases", batch=BATCH, pause=0
    )

    gone = released + expired + failed
    assert result.deleted("workspaces.environment_leases") == len(gone)
    assert result.batches("workspaces.environment_leases") == len(gone) // BATCH + 1
    assert await s.count_in(db, "workspaces.environment_leases", "id", gone) == 0
    kept = young + active
    assert await s.count_in(db, "workspaces.environment_leases", "id", kept) == len(kept)
