"""A PostgreSQL outage under load (issue 11, "Database outages").

The issue, workspace and run services run as processes on a PostgreSQL server of this test alone
(embedded, so it can be killed). Four agent runs are running (each sleeps 4 s) when the
server's postmaster gets SIGKILL; it stays down for ``OUTAGE_S`` (longer than a node's
lease) while calls keep coming (5 s deadlines) and the runs' processes exit. Then it is
started again on the same data directory.

Expected: no service exits; every call answers OK or UNAVAILABLE with reason
``DATABASE_UNAVAILABLE`` (never INTERNAL, UNKNOWN or a missed deadline); health is
NOT_SERVING during the outage and SERVING again, and calls succeed, within 5 s of the
server's return; each service writes a bounded number of log lines about it; every run
that ended during the outage is recorded succeeded (its exit was not lost, no retry).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.db import Database
from common.errors import STATUS_DETAILS_KEY, from_rpc_error
from common.migrate import migrate
from local_suite.embedded_pg import EmbeddedPostgres
from paperclip.issues.v1 import issues_pb2
from supervision import process_group
from tests.e2e import service_processes
from tests.e2e.service_processes import rows
from tests.harness import INTERNAL_KEY, Suite, admin, new_company
from tests.run_service.test_runner import agent_command, create_agent, queue_run

pytestmark = pytest.mark.e2e

OUTAGE_S = 20.0
SERVES_WITHIN_S = 5.0
RUNS = 4
#: Log lines a service may write while the database is away (the outage's start and
#: end, a summary, a few lines of its background loops noticing it).
MAX_OUTAGE_LINES = 15
MARKER = f"outage-{uuid.uuid4().hex[:10]}"


@dataclass
class Service:
    name: str
    child: process_group.Child
    log: Path
    addr: str = ""


@dataclass
class Outage:
    """What the load saw."""

    codes: Counter[str] = field(default_factory=Counter)
    health: Counter[str] = field(default_factory=Counter)


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres.start(tmp_path / "pgdata", database="outage")
    try:
        yield server
    finally:
        server.stop()
        service_processes.kill_agents(MARKER)


def _start(name: str, module: str, env: dict[str, str], home: Path) -> Service:
    ready = home / f"{name}.ready"
    log = home / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            env={**env, "PAPERCLIP_READY_FILE": str(ready)},
            stderr=out,
            process_group=0,
        )
    child = process_group.Child(process_group.ProcessSpec(module, ""), process, ready)
    service = Service(name, child, log)
    service.addr = process_group.wait_ready(child, timeout=60, stop_requested=lambda: False)
    return service


@pytest.fixture
async def services(pg: EmbeddedPostgres, tmp_path: Path) -> AsyncIterator[list[Service]]:
    await migrate(pg.url)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PAPERCLIP_")}
    env = {
        **inherited,
        "PAPERCLIP_HOME": str(tmp_path),
        "PAPERCLIP_DATABASE_URL": pg.url,
        "PAPERCLIP_INTERNAL_KEY": INTERNAL_KEY.decode(),
        "PAPERCLIP_JWT_SECRET": "outage-test-jwt-secret-0123456789abcdef",
        "PAPERCLIP_GATEWAY_ADDR": "127.0.0.1:1",
        "PAPERCLIP_WORKSPACE_SERVICE_ADDR": "127.0.0.1:0",
        "PAPERCLIP_ISSUE_SERVICE_ADDR": "127.0.0.1:0",
        "PAPERCLIP_RUN_SERVICE_ADDR": "127.0.0.1:0",
        "PAPERCLIP_DISPATCH_POLL_MS": "200",
        "PAPERCLIP_LOG_LEVEL": "INFO",
    }
    started: list[Service] = []
    try:
        issue = _start("issue", "issue_service", env, tmp_path)
        started.append(issue)
        env["PAPERCLIP_ISSUE_SERVICE_ADDR"] = issue.addr
        workspace = _start("workspace", "workspace_service", env, tmp_path)
        started.append(workspace)
        env["PAPERCLIP_WORKSPACE_SERVICE_ADDR"] = workspace.addr
        started.append(_start("run", "run_service", env, tmp_path))
        yield started
    finally:
        process_group.stop_all([s.child for s in started], grace=10)


async def test_services_ride_out_a_database_outage(
    pg: EmbeddedPostgres, services: list[Service]
) -> None:
    issue, _, run = services
    db = Database(pg.url, pool_size=2, max_overflow=2, name="outage-test")
    suite = Suite(issue_addr=issue.addr, run_addr=run.addr, db=db)
    try:
        clients = suite.clients(admin())
        company = (await new_company(clients)).id
        agent = await create_agent(
            clients,
            company,
            agent_command("sleep.py", "4", "1", MARKER),
            max_concurrent_runs=RUNS,
        )
        runs = [await queue_run(db, company_id=company, agent_id=agent) for _ in range(RUNS)]
        await _until_running(db, runs)
        await db.dispose()  # its connections die with the server

        postmaster = psutil.Process(int((pg.data_dir / "postmaster.pid").read_text().split()[0]))
        postmaster.send_signal(signal.SIGKILL)
        killed_at = time.time()
        seen = Outage()
        stop = asyncio.Event()
        load = asyncio.create_task(_load(suite, company, issue.addr, seen, stop))
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(_restart, pg)
        back_at = time.monotonic()
        back_wall = time.time()
        serving_at = await _serving_again(suite, company, issue.addr)
        stop.set()
        await load
        assert serving_at - back_at <= SERVES_WITHIN_S, serving_at - back_at

        assert all(s.child.process.poll() is None for s in services), "a service exited"
        assert set(seen.codes) <= {"OK", "UNAVAILABLE DATABASE_UNAVAILABLE"}, seen.codes
        assert seen.codes["UNAVAILABLE DATABASE_UNAVAILABLE"] > 0, seen.codes
        assert seen.health["NOT_SERVING"] > 0, seen.health
        for service in services:
            lines = _lines_between(service.log, killed_at, back_wall)
            assert len(lines) <= MAX_OUTAGE_LINES, (service.name, len(lines), lines[:20])

        await _all_recorded(db, runs)
    finally:
        await suite.close()
        await db.dispose()


def _restart(pg: EmbeddedPostgres) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            pg.restart()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


async def _until_running(db: Database, runs: list[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        found = await rows(
            db,
            "SELECT count(*) AS n FROM runs.heartbeat_runs"
            " WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'running'"
            " AND process_pid IS NOT NULL",
            ids=runs,
        )
        if int(found[0]["n"]) == len(runs):
            return
        assert time.monotonic() < deadline, "the runs did not start"
        await asyncio.sleep(0.1)


async def _call(suite: Suite, company: str) -> str:
    clients = suite.clients(admin())
    try:
        await clients.issues.CreateIssue(
            issues_pb2.CreateIssueRequest(
                company_id=company, title="During the outage", request_id=str(uuid.uuid4())
            ),
            timeout=5,
        )
        await clients.issues.GetCompany(issues_pb2.GetCompanyRequest(company_id=company), timeout=5)
    except grpc.aio.AioRpcError as err:
        error = from_rpc_error(err)
        has_details = any(key == STATUS_DETAILS_KEY for key, _ in err.trailing_metadata() or ())
        return f"{error.code.name} {error.reason}" if has_details else f"{err.code().name} bare"
    finally:
        await clients.close()
    return "OK"


async def _health(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.aio.AioRpcError as err:
            return err.code().name
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def _load(
    suite: Suite, company: str, issue_addr: str, seen: Outage, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        seen.codes[await _call(suite, company)] += 1
        seen.health[await _health(issue_addr)] += 1
        await asyncio.sleep(0.2)


async def _serving_again(suite: Suite, company: str, issue_addr: str) -> float:
    """When calls succeed and health says SERVING again (monotonic time)."""
    deadline = time.monotonic() + 30
    while True:
        if await _call(suite, company) == "OK" and await _health(issue_addr) == "SERVING":
            return time.monotonic()
        assert time.monotonic() < deadline, "the suite did not serve again"
        await asyncio.sleep(0.1)


def _lines_between(log: Path, start: float, end: float) -> list[str]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # gRPC's own lines
        stamp = entry.get("ts", "")
        when = time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        if start <= when <= end:
            found.append(f"{entry.get('level')} {entry.get('logger')} {entry.get('msg')}")
    return found


async def _all_recorded(db: Database, runs: list[str]) -> None:
    """Every run ended succeeded, once, with its output, and none was retried."""
    deadline = time.monotonic() + 30
    while True:
        found = await rows(
            db,
            """
            SELECT r.id, r.status, r.error_code,
                   (SELECT count(*) FROM runs.run_events e
                    WHERE e.run_id = r.id AND e.message = 'run started') AS starts,
                   (SELECT count(*) FROM runs.run_events e
                    WHERE e.run_id = r.id AND e.type = 'stdout' AND e.message LIKE '%done%')
                       AS done,
                   (SELECT count(*) FROM runs.heartbeat_runs x WHERE x.retry_of_run_id = r.id)
                       AS retries
            FROM runs.heartbeat_runs r WHERE r.id = ANY(CAST(:ids AS uuid[]))
            """,
            ids=runs,
        )
        if all(r["status"] not in ("queued", "running") for r in found):
            break
        assert time.monotonic() < deadline, [dict(r) for r in found]
        await asyncio.sleep(0.2)
    bad = [
        dict(r)
        for r in found
        if (r["status"], r["starts"], r["retries"]) != ("succeeded", 1, 0) or r["done"] < 1
    ]
    assert not bad, bad
