"""The reaper of closed issues' services (user asks row 21): when an issue moves to done,
the services of its isolated workspace stop at once (on the issue-event NOTIFY) and stay
stopped; a shared workspace of the same issue keeps its services."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from common.database_url import asyncpg_dsn
from common.db import Database
from common.sql import sql
from paperclip.issues.v1 import issues_pb2
from tests.conftest import Services
from tests.e2e import service_processes
from tests.harness import Clients, admin, new_company
from tests.workspace_service.test_runtime_services import (
    MARKER,
    alive,
    eventually,
    new_workspace,
    service_row,
    start,
    web,
)
from workspace_service import issue_reaper, store


@pytest.fixture(scope="module")
async def board(services: Services) -> AsyncIterator[Clients]:
    yield services.suite.clients(admin())
    service_processes.kill_agents(MARKER)  # a safety net after a failed test


async def test_done_issue_stops_its_isolated_workspace_services_and_keeps_them_stopped(
    services: Services, db: Database, board: Clients, database_url: str, tmp_path: Path
) -> None:
    deps = services.workspace
    company = (await new_company(board)).id
    issue = await board.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company, title="ship it")
    )
    running = {"source_issue_id": issue.id}
    isolated = await new_workspace(db, company, tmp_path, web("web"), web("api"), **running)
    shared = await new_workspace(db, company, tmp_path, web(), mode="shared_workspace", **running)
    reaped = [await start(deps.runtime, isolated, 0), await start(deps.runtime, isolated, 1)]
    kept = await start(deps.runtime, shared)
    # The reaper's LISTEN connection carries a name of its own, so the test can tell
    # when it listens: a notification sent before that would be missed.
    name = f"reaper-test-{uuid.uuid4().hex[:8]}"
    dsn = asyncpg_dsn(database_url)
    dsn += f"{'&' if '?' in dsn else '?'}application_name={name}"
    reaper = asyncio.create_task(issue_reaper.reap_forever(deps, dsn, interval=3600))
    try:
        await eventually(lambda: _listening(db, name), "the reaper to LISTEN")

        await board.issues.UpdateIssue(
            issues_pb2.UpdateIssueRequest(
                issue=issues_pb2.Issue(id=issue.id, status=issues_pb2.ISSUE_STATUS_DONE),
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            )
        )

        async def stopped() -> bool:
            rows = [await service_row(db, s.id) for s in reaped]
            return not any(row.is_live for row in rows)

        # The poll is an hour away: only the NOTIFY can make this pass.
        await eventually(stopped, "the isolated workspace's services to stop")
    finally:
        reaper.cancel()
        await asyncio.gather(reaper, return_exceptions=True)

    for service in reaped:
        row = await service_row(db, service.id)
        assert (row.status, row.health_status) == ("stopped", "unknown")
        assert row.pid is not None and alive({row.pid}) == set()
    assert (await service_row(db, kept.id)).status == "running"
    async with db.unit_of_work() as tx:
        workspace = await store.get_workspace(tx, isolated.id)
    assert workspace is not None and workspace.config is not None
    assert workspace.config["desired_state"] == "stopped"
    assert workspace.config["service_states"] == {"0": "stopped", "1": "stopped"}
    [audit] = await _audit(db, isolated.id, "execution_workspace.runtime_stop")
    assert (audit["actor_type"], audit["details"]["reason"]) == ("system", "issue_closed")
    assert sorted(audit["details"]["runtimeServiceIds"]) == sorted(s.id for s in reaped)
    # Another pass leaves the shared workspace alone too.
    await issue_reaper.reap_once(deps)
    assert (await service_row(db, kept.id)).status == "running"
    await deps.runtime.stop_service(kept, reason="test")


async def _listening(db: Database, application_name: str) -> bool:
    async with db.unit_of_work() as tx:
        query = await tx.fetchval(
            sql("SELECT query FROM pg_stat_activity WHERE application_name = :name"),
            {"name": application_name},
        )
    return bool(query) and str(query).startswith("LISTEN")


async def _audit(db: Database, entity_id: str, action: str) -> list[dict[str, Any]]:
    async with db.unit_of_work() as tx:
        rows = await tx.fetch(
            sql(
                "SELECT actor_type, details FROM audit.activity_log"
                " WHERE entity_id = :id AND action = :action"
            ),
            {"id": entity_id, "action": action},
        )
    return [
        {
            "actor_type": r["actor_type"],
            "details": json.loads(r["details"]) if isinstance(r["details"], str) else r["details"],
        }
        for r in rows
    ]
