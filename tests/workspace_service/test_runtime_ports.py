"""Ports of runtime services (user asks row 22): an explicit port that is busy or
reserved is refused before anything starts; automatic ports are reserved in the database
before the spawn, so workspaces starting at the same time never share one, even when
they all prefer the same port."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.db import Database
from common.errors import FailedPrecondition
from common.sql import sql
from tests.conftest import Services
from tests.e2e import service_processes
from tests.harness import admin, new_company
from tests.workspace_service.test_runtime_services import (
    MARKER,
    new_workspace,
    pids_of,
    service_of,
    service_row,
    start,
    tree_pids,
    web,
)
from workspace_service import runtime_store
from workspace_service.model import WorkspaceRecord
from workspace_service.ports import free_port
from workspace_service.runtime_services import RuntimeSupervisor

CONCURRENT_STARTS = 10


@pytest.fixture
def runtime(services: Services) -> RuntimeSupervisor:
    return services.workspace.runtime


@pytest.fixture(scope="module")
async def company_id(services: Services) -> AsyncIterator[str]:
    yield (await new_company(services.suite.clients(admin()))).id
    service_processes.kill_agents(MARKER)  # a safety net after a failed test


async def test_explicit_port_with_a_listener_is_refused_and_nothing_starts(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        workspace = await new_workspace(db, company_id, tmp_path, web(auto_port=False, port=port))

        with pytest.raises(FailedPrecondition) as caught:
            await start(runtime, workspace)

    assert caught.value.reason == "RUNTIME_PORT_IN_USE"
    assert caught.value.message == f"port {port} is already in use by pid {os.getpid()}"
    assert await _services_of(db, workspace) == [("stopped", None, None)]


async def test_explicit_port_reserved_in_the_database_is_refused(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    port = free_port()
    holder = await new_workspace(db, company_id, tmp_path, web(auto_port=False, port=port))
    # A start of another workspace reserved the port and has not spawned yet.
    async with db.unit_of_work() as tx:
        row = await runtime_store.upsert_service(
            tx, workspace=holder, command=service_of(holder), cwd=str(tmp_path), host=runtime.host
        )
        await runtime_store.mark_starting(
            tx,
            row.id,
            host=runtime.host,
            command=service_of(holder),
            command_line="true",
            cwd=str(tmp_path),
            port=port,
            url=None,
            run_id=None,
        )
    workspace = await new_workspace(db, company_id, tmp_path, web(auto_port=False, port=port))
    try:
        with pytest.raises(FailedPrecondition) as caught:
            await start(runtime, workspace)
    finally:
        async with db.unit_of_work() as tx:
            await runtime_store.mark_ended(
                tx, row.id, status="stopped", health="unknown", last_error=None
            )

    assert caught.value.reason == "RUNTIME_PORT_IN_USE"
    assert caught.value.message == f"port {port} is already in use"
    assert await _services_of(db, workspace) == [("stopped", None, None)]


async def test_concurrent_automatic_ports_are_never_shared(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    workspaces = [
        await new_workspace(db, company_id, tmp_path, web()) for _ in range(CONCURRENT_STARTS)
    ]

    started = await asyncio.gather(*(start(runtime, w) for w in workspaces))
    try:
        ports = [s.port for s in started]
        assert len(set(ports)) == CONCURRENT_STARTS
        for service in started:
            # Whoever answers on the port is a process of that service's own tree.
            assert service.pid is not None
            assert await pids_of(service) <= tree_pids(service.pid)
    finally:
        await asyncio.gather(*(runtime.stop_service(s, reason="test") for s in started))


async def test_workspaces_preferring_the_same_port_get_it_one_at_a_time(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    first, second, third = [await new_workspace(db, company_id, tmp_path, web()) for _ in range(3)]
    earlier = await start(runtime, first)
    await runtime.stop_service(earlier, reason="test")
    assert earlier.port is not None
    # The rows of the other two remember the same port from an earlier start.
    for workspace in (second, third):
        await _remember_port(db, workspace, earlier.port, tmp_path)

    started = await asyncio.gather(*(start(runtime, w) for w in (first, second, third)))
    try:
        ports = sorted(s.port or 0 for s in started)
        assert len(set(ports)) == 3
        assert earlier.port in ports
    finally:
        await asyncio.gather(*(runtime.stop_service(s, reason="test") for s in started))


async def test_automatic_port_reuses_the_previous_port_when_free(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    workspace = await new_workspace(db, company_id, tmp_path, web())
    first = await start(runtime, workspace)
    await runtime.stop_service(first, reason="test")

    again = await start(runtime, workspace)
    await runtime.stop_service(again, reason="test")

    assert (again.id, again.port) == (first.id, first.port)
    assert again.pid != first.pid
    assert (await service_row(db, again.id)).status == "stopped"


async def _remember_port(db: Database, workspace: WorkspaceRecord, port: int, cwd: Path) -> None:
    async with db.unit_of_work() as tx:
        row = await runtime_store.upsert_service(
            tx, workspace=workspace, command=service_of(workspace), cwd=str(cwd), host="unused"
        )
        await tx.execute(
            sql("UPDATE workspaces.runtime_services SET port = :port WHERE id = :id"),
            {"port": port, "id": row.id},
        )


async def _services_of(
    db: Database, workspace: WorkspaceRecord
) -> list[tuple[str, int | None, int | None]]:
    """(status, pid, port) of each runtime service row of ``workspace``."""
    async with db.unit_of_work() as tx:
        rows = await tx.fetch(
            sql(
                "SELECT status, pid, port FROM workspaces.runtime_services WHERE workspace_id = :w"
            ),
            {"w": workspace.id},
        )
    return [(r["status"], r["pid"], r["port"]) for r in rows]
