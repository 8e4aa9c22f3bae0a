"""Session fixtures: one real PostgreSQL (embedded unless PAPERCLIP_TEST_DATABASE_URL
is set), a fresh migrated database, and the real servers on port 0."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

# The test process starts agents, services and PostgreSQL while its own gRPC servers run:
# gRPC's fork handlers must not run in those children (see supervision.process_group).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest

from common.config import Settings, load_settings
from common.database_url import normalize_database_url
from common.db import Database
from common.server import RunningServer, start_server
from issue_service.app import service_specs as issue_specs
from local_suite.embedded_pg import EmbeddedPostgres
from run_service.app import service_specs as run_specs
from run_service.runner import Runner
from tests.databases import fresh_database
from tests.harness import INTERNAL_KEY, Suite
from workspace_service.app import build_context
from workspace_service.app import service_specs as workspace_specs
from workspace_service.service_context import ServiceContext


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL server URL (any database on it) the test session may create in."""
    external = os.environ.get("PAPERCLIP_TEST_DATABASE_URL")
    if external:
        yield normalize_database_url(external)
        return
    with tempfile.TemporaryDirectory(prefix="paperclip-test-pg-") as tmp:
        pg = EmbeddedPostgres.start(Path(tmp) / "pgdata", database="postgres")
        try:
            yield pg.url
        finally:
            pg.stop()


@pytest.fixture(scope="session")
async def database_url(server_url: str) -> AsyncIterator[str]:
    """A fresh database, migrated, dropped at the end of the session."""
    async with fresh_database(server_url, "paperclip_test") as url:
        yield url


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, pool_size=20, max_overflow=40, name="tests")
    yield database
    await database.dispose()


@dataclass
class Services:
    """The in-process services of the session and the run service's runner."""

    suite: Suite
    runner: Runner
    #: The settings the run service (and its runner) were built with.
    settings: Settings
    #: The workspace service's context (its runtime supervisor among them).
    workspace: ServiceContext


@pytest.fixture(scope="session")
async def services(db: Database, database_url: str) -> AsyncIterator[Services]:
    """The issue, workspace and run services, each on its own real socket, port 0, and
    the run service's runner (dispatch and supervision) started once the servers listen.
    The workspace service's background passes (start-up, lease sweep, reaper) do not
    run: tests call them.

    The runner dispatches only the companies in ``runner.companies`` (empty at first):
    tests share one database, and tests of other services insert queued runs that must
    stay queued. A test that wants its runs executed adds its company (``dispatching``).
    """
    settings = load_settings(
        {
            "PAPERCLIP_HOME": tempfile.mkdtemp(prefix="paperclip-test-home-"),
            "PAPERCLIP_DATABASE_URL": database_url,
            "PAPERCLIP_INTERNAL_KEY": INTERNAL_KEY.decode(),
            "PAPERCLIP_JWT_SECRET": "test-jwt-secret-0123456789abcdef-runs",
            "PAPERCLIP_DISPATCH_POLL_MS": "200",
        }
    )
    issue_db = Database(database_url, pool_size=20, max_overflow=40, name="issue_service")
    run_db = Database(database_url, pool_size=10, max_overflow=10, name="run_service")
    issue_server = await start_server(issue_specs(issue_db, settings), "127.0.0.1:0", INTERNAL_KEY)
    workspace_db = Database(database_url, pool_size=10, max_overflow=20, name="workspace_service")
    workspace_context = build_context(workspace_db, settings, host=f"test-{uuid.uuid4().hex[:8]}")
    workspace_server = await start_server(
        workspace_specs(workspace_context), "127.0.0.1:0", INTERNAL_KEY
    )
    run_settings = replace(
        settings,
        issue_service_addr=f"127.0.0.1:{issue_server.port}",
        workspace_service_addr=f"127.0.0.1:{workspace_server.port}",
    )
    runner = Runner(run_db, run_settings, companies=set())
    run_server = await start_server(run_specs(run_db, runner), "127.0.0.1:0", INTERNAL_KEY)
    runner_task = asyncio.create_task(runner.run(), name="test-runner")
    servers: list[RunningServer] = [issue_server, run_server, workspace_server]
    the_suite = Suite(
        issue_addr=f"127.0.0.1:{issue_server.port}",
        run_addr=f"127.0.0.1:{run_server.port}",
        workspace_addr=f"127.0.0.1:{workspace_server.port}",
        db=db,
    )
    try:
        yield Services(the_suite, runner, run_settings, workspace_context)
    finally:
        await the_suite.close()
        runner_task.cancel()
        await asyncio.gather(runner_task, return_exceptions=True)
        await runner.stop()  # while the issue service still answers ReleaseRunLocks
        await workspace_context.runtime.shutdown()
        await asyncio.gather(*(s.stop(0.5) for s in servers))
        await issue_db.dispose()
        await run_db.dispose()
        await workspace_db.dispose()


@pytest.fixture(scope="session")
async def suite(services: Services) -> Suite:
    """The issue and run services (see ``services``)."""
    return services.suite


@pytest.fixture(scope="session")
async def runner(services: Services) -> Runner:
    """The run service's runner; add a company to ``runner.companies`` to have its
    queued runs dispatched."""
    await services.runner.wait_registered()
    return services.runner
