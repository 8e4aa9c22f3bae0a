"""Runtime services as real process trees: start on
a reserved port, readiness over HTTP, the environment a service gets, the watcher of a
service that exits by itself, and a stop that leaves no process of the tree behind.

The helpers here are shared by the other ``test_runtime_*`` modules and the reaper's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from common.db import Database
from common.errors import FailedPrecondition
from common.sql import sql
from tests.conftest import Services
from tests.e2e import service_processes
from tests.harness import admin, new_company
from tests.workspace_service.support import insert_workspace, service_config
from workspace_service import commands
from workspace_service.commands import CommandDef, Readiness
from workspace_service.model import RuntimeServiceRecord, WorkspaceRecord
from workspace_service.recorder import Operation
from workspace_service.runtime_services import RuntimeSupervisor

SERVER = Path(__file__).resolve().parents[1] / "agents" / "http_server.py"
#: On the command line of every process these tests start, to find leftovers.
MARKER = f"runtime-test-{uuid.uuid4().hex[:10]}"
READY = {"url": "http://127.0.0.1:{{port}}/", "interval_ms": 100, "timeout_seconds": 20}


def server_command() -> str:
    """The shell command running the test dev server (with this session's marker)."""
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(SERVER))} {MARKER}"


def web(name: str = "web", **fields: Any) -> dict[str, Any]:
    """A dev-server service definition on an automatic port, ready when ``/`` is 2xx."""
    return {
        "name": name,
        "command": server_command(),
        "auto_port": True,
        "readiness": READY,
        **fields,
    }


def new_op() -> Operation:
    """An operation to note into (its row is not needed below the RPCs)."""
    return Operation(id=str(uuid.uuid4()), phase="workspace_provision", command="test")


async def new_workspace(
    db: Database, company_id: str, cwd: Path, *services: dict[str, Any], **fields: Any
) -> WorkspaceRecord:
    """A workspace in ``cwd`` whose runtime config holds ``services``."""
    return await insert_workspace(
        db, company_id, cwd=str(cwd), config=service_config(*services), **fields
    )


def service_of(workspace: WorkspaceRecord, index: int = 0) -> CommandDef:
    return commands.services(workspace.config)[index]


async def start(
    runtime: RuntimeSupervisor, workspace: WorkspaceRecord, index: int = 0
) -> RuntimeServiceRecord:
    return await runtime.start_service(workspace, service_of(workspace, index), op=new_op())


async def service_row(db: Database, service_id: str) -> RuntimeServiceRecord:
    async with db.unit_of_work() as tx:
        row = await tx.fetchrow(
            sql("SELECT * FROM workspaces.runtime_services WHERE id = :id"), {"id": service_id}
        )
    assert row is not None
    return RuntimeServiceRecord.from_row(row)


async def http_get(url: str) -> tuple[int, bytes]:
    """Status and body of a GET (urllib, in a thread)."""

    def get() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    return await asyncio.to_thread(get)


async def refused(url: str) -> bool:
    """Whether nothing answers at ``url`` any more."""
    try:
        await http_get(url)
    except urllib.error.URLError:
        return True
    return False


async def pids_of(row: RuntimeServiceRecord) -> set[int]:
    """The pids the dev server of ``row`` reports: itself and its child."""
    _, body = await http_get(f"http://127.0.0.1:{row.port}/pids")
    reported = json.loads(body)
    return {pid for pid in (reported["pid"], reported["child"]) if pid}


def tree_pids(pid: int) -> set[int]:
    """``pid`` and its live descendants."""
    try:
        return {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        return set()


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if psutil.pid_exists(pid) and _not_zombie(pid)}


def group_members(pgid: int) -> set[int]:
    """The live processes of process group ``pgid``."""
    found = set()
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and _not_zombie(pid):
                found.add(pid)
        except OSError:
            continue
    return found


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 20) -> None:
    """Wait until ``check()`` holds; fail with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def company_id(services: Services) -> AsyncIterator[str]:
    yield (await new_company(services.suite.clients(admin()))).id
    service_processes.kill_agents(MARKER)  # a safety net after a failed test


@pytest.fixture
def runtime(services: Services) -> RuntimeSupervisor:
    return services.workspace.runtime


async def test_dev_server_answers_on_its_port_and_stop_leaves_no_process_of_its_tree(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    service = {**web(), "env": {"SPAWN_CHILD": "1"}}
    workspace = await new_workspace(db, company_id, tmp_path, service)
    op = new_op()

    started = await runtime.start_service(workspace, service_of(workspace), op=op)

    assert (started.status, started.health_status, started.host) == (
        "running",
        "healthy",
        runtime.host,
    )
    assert started.port is not None and started.pid is not None
    assert started.url == f"http://127.0.0.1:{started.port}/"
    assert await http_get(started.url) == (200, b'{"ok": true}')
    tree = await pids_of(started)
    assert len(tree) == 2 and alive(tree) == tree
    assert f"Started web on port {started.port} (pid {started.pid})" in op.stdout.text()

    stopped = await runtime.stop_service(started, reason="test", op=op)

    assert (stopped.status, stopped.health_status) == ("stopped", "unknown")
    assert stopped.stopped_at is not None
    assert alive(tree) == set()
    assert await refused(started.url)
    assert await service_row(db, started.id) == stopped


async def test_scenario_24_service_env_has_no_paperclip_settings_but_its_env_and_port(
    runtime: RuntimeSupervisor,
    db: Database,
    company_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAPERCLIP_TEST_SECRET", "secret")
    monkeypatch.setenv("DATABASE_URL", "postgresql://secret")
    monkeypatch.setenv("ANALYTICS_DATABASE_URL", "postgresql://secret")
    monkeypatch.setenv("RUNTIME_TEST_INHERITED", "kept")
    service = {
        **web(),
        "port_env": "APP_PORT",
        "env": {"PORT_ENV": "APP_PORT", "GREETING": "hi on {{port}}", "WS": "{{workspace.id}}"},
    }
    workspace = await new_workspace(db, company_id, tmp_path, service)

    started = await start(runtime, workspace)
    try:
        _, body = await http_get(f"http://127.0.0.1:{started.port}/env")
    finally:
        await runtime.stop_service(started, reason="test")

    env = json.loads(body)
    assert not [key for key in env if key.startswith("PAPERCLIP_") or key.endswith("DATABASE_URL")]
    assert env["RUNTIME_TEST_INHERITED"] == "kept"
    assert env["APP_PORT"] == str(started.port)
    assert env["GREETING"] == f"hi on {started.port}"
    assert env["WS"] == workspace.id
    assert "PORT" not in env


async def test_starting_a_running_service_returns_it_without_a_second_process(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    workspace = await new_workspace(db, company_id, tmp_path, web())
    first = await start(runtime, workspace)
    op = new_op()
    try:
        again = await runtime.start_service(workspace, service_of(workspace), op=op)
    finally:
        await runtime.stop_service(first, reason="test")

    assert (again.id, again.pid, again.port) == (first.id, first.pid, first.port)
    assert "already running" in op.stdout.text()


async def test_readiness_failure_fails_the_row_with_the_stderr_tail_and_kills_the_tree(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    service = {
        **web(),
        "readiness": {**READY, "timeout_seconds": 1},
        "env": {"STATUS": "503", "SPAWN_CHILD": "1", "BOOT_MESSAGE": "booting badly"},
    }
    workspace = await new_workspace(db, company_id, tmp_path, service)

    with pytest.raises(FailedPrecondition) as caught:
        await start(runtime, workspace)

    error = caught.value
    assert error.reason == "RUNTIME_SERVICE_START_FAILED"
    assert error.message.startswith('Failed to start runtime service "web": ')
    assert "did not answer 2xx within 1 s (last: HTTP 503)" in error.message
    assert " | stderr: " in error.message and "booting badly" in error.message
    row = await service_row(db, error.metadata["runtime_service_id"])
    assert (row.status, row.health_status, row.last_error) == ("failed", "unhealthy", error.message)
    assert row.pid is not None and row.port is not None
    assert row.pgid == row.pid and group_members(row.pgid) == set()
    assert not service_processes.agent_processes(MARKER)
    # The port is no longer reserved: an explicit start on it goes through.
    explicit = await new_workspace(db, company_id, tmp_path, web(auto_port=False, port=row.port))
    taken = await start(runtime, explicit)
    await runtime.stop_service(taken, reason="test")
    assert taken.port == row.port


async def test_process_exiting_before_ready_fails_the_start_at_once(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    service = {
        "name": "crash",
        "command": "echo 'no such module' >&2; exit 4",
        "auto_port": True,
        "readiness": {**READY, "timeout_seconds": 120},
    }
    workspace = await new_workspace(db, company_id, tmp_path, service)

    with pytest.raises(FailedPrecondition) as caught:
        await start(runtime, workspace)

    # A readiness wait that missed the exit would end in "did not answer ... 120 s".
    assert "the process exited with code 4 before http://127.0.0.1:" in caught.value.message
    assert caught.value.message.endswith("| stderr: no such module")
    row = await service_row(db, caught.value.metadata["runtime_service_id"])
    assert row.status == "failed"


def test_scenario_28_readiness_timeouts_follow_the_reference_rules() -> None:
    def timeout(command: str, explicit: int = 0) -> int:
        readiness = Readiness(timeout_seconds=explicit)
        definition = CommandDef(
            id="s", name="s", kind="service", command=command, readiness=readiness
        )
        return definition.ready_timeout()

    assert timeout("pnpm dev") == 90
    assert timeout("npm run dev -- --port 3000") == 90
    assert timeout("node server.js", explicit=12) == 12
    assert timeout("node server.js") == 30


async def test_watcher_marks_a_service_that_exits_by_itself(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    wait_gate = f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.05; done"
    workspace = await new_workspace(
        db,
        company_id,
        tmp_path,
        {"name": "crashes", "command": f"{wait_gate}; echo 'fatal: out of memory' >&2; exit 3"},
        {"name": "finishes", "command": f"{wait_gate}; exit 0"},
    )
    crashes = await start(runtime, workspace, 0)
    finishes = await start(runtime, workspace, 1)
    assert (crashes.status, finishes.status) == ("running", "running")

    gate.touch()

    async def both_ended() -> bool:
        rows = [await service_row(db, s.id) for s in (crashes, finishes)]
        return all(not r.is_live for r in rows)

    await eventually(both_ended, "the watcher to record both exits")
    crashed, finished = await service_row(db, crashes.id), await service_row(db, finishes.id)
    assert (crashed.status, crashed.health_status) == ("failed", "unhealthy")
    assert crashed.last_error == (
        'Runtime service "crashes" exited with code 3 | stderr: fatal: out of memory'
    )
    assert (finished.status, finished.health_status, finished.last_error) == (
        "stopped",
        "unknown",
        None,
    )
    assert crashed.stopped_at is not None and finished.stopped_at is not None


async def test_scenario_25_stop_workspace_stops_every_live_service_of_the_workspace(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    workspace = await new_workspace(db, company_id, tmp_path, web("web"), web("api"))
    other = await new_workspace(db, company_id, tmp_path, web("web"))
    started = [await start(runtime, workspace, 0), await start(runtime, workspace, 1)]
    bystander = await start(runtime, other)
    trees = [await pids_of(s) for s in started]

    stopped = await runtime.stop_workspace(workspace.id, reason="test")

    assert sorted((s.service_name, s.status) for s in stopped) == [
        ("api", "stopped"),
        ("web", "stopped"),
    ]
    assert alive(set().union(*trees)) == set()
    assert (await service_row(db, bystander.id)).status == "running"
    await runtime.stop_service(bystander, reason="test")


async def test_stop_is_refused_for_a_service_on_another_host(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    workspace = await new_workspace(db, company_id, tmp_path, web())
    row = await _recorded_row(db, workspace, host="another-host", pid=None)

    with pytest.raises(FailedPrecondition) as caught:
        await runtime.stop_service(row, reason="test")

    assert caught.value.reason == "RUNTIME_SERVICE_ON_OTHER_HOST"
    assert (await service_row(db, row.id)).status == "running"


async def test_stopping_a_service_whose_process_is_gone_just_marks_it(
    runtime: RuntimeSupervisor, db: Database, company_id: str, tmp_path: Path
) -> None:
    workspace = await new_workspace(db, company_id, tmp_path, web())
    gone = psutil.Popen(["true"])
    create_time = gone.create_time()
    gone.wait()
    row = await _recorded_row(db, workspace, host=runtime.host, pid=(gone.pid, create_time))

    stopped = await runtime.stop_service(row, reason="test")

    assert (stopped.status, stopped.health_status) == ("stopped", "unknown")
    assert stopped.stopped_at is not None


async def _recorded_row(
    db: Database, workspace: WorkspaceRecord, *, host: str, pid: tuple[int, float] | None
) -> RuntimeServiceRecord:
    """A ``running`` row as an earlier process would have left it (no process here)."""
    command = service_of(workspace)
    async with db.unit_of_work() as tx:
        row = await tx.fetchrow(
            sql(
                """
                INSERT INTO workspaces.runtime_services (
                    company_id, workspace_id, workspace_command_id, service_name,
                    service_index, status, health_status, command, cwd, host, pid, pgid,
                    create_time, started_at
                ) VALUES (
                    :company_id, :workspace_id, :command_id, :name, 0, 'running', 'healthy',
                    :command, :cwd, :host, :pid, :pid, :create_time, now()
                ) RETURNING *
                """
            ),
            {
                "company_id": workspace.company_id,
                "workspace_id": workspace.id,
                "command_id": command.id,
                "name": command.name,
                "command": command.command,
                "cwd": workspace.cwd,
                "host": host,
                "pid": pid[0] if pid else None,
                "create_time": pid[1] if pid else None,
            },
        )
    assert row is not None
    return RuntimeServiceRecord.from_row(row)
