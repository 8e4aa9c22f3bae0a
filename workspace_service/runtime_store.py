"""SQL of ``workspaces.runtime_services`` rows, in the unit of work of the caller.

One row per (workspace, command), reused by every start of that service. A row moves
``starting`` (port reserved, then process recorded) -> ``running`` -> ``stopped`` or
``failed``. Every write after the spawn is guarded by the row's status and pid, so a
watcher that reports a process's end never overwrites the row of a later process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg

from common.db import Database
from common.sql import Tx, sql
from workspace_service import foreign_reads
from workspace_service.commands import CommandDef
from workspace_service.model import RuntimeServiceRecord, WorkspaceRecord

#: The partial unique index that reserves a port per host while a service holds it.
PORT_INDEX = "runtime_services_port_idx"
#: Workspaces whose desired-running services are restarted with the workspace service.
RESTARTABLE_STATUSES = ("active", "idle", "in_review", "cleanup_failed")

_UPSERT = sql(
    """
    INSERT INTO workspaces.runtime_services (
        company_id, workspace_id, workspace_command_id, service_name, service_index,
        command, cwd, host
    ) VALUES (
        :company_id, :workspace_id, :command_id, :name, :index, :command, :cwd, :host
    )
    ON CONFLICT (workspace_id, workspace_command_id)
        DO UPDATE SET updated_at = workspaces.runtime_services.updated_at
    RETURNING *
    """
)
_GET = sql("SELECT * FROM workspaces.runtime_services WHERE id = :id")
_MARK_STARTING = sql(
    """
    UPDATE workspaces.runtime_services
       SET status = 'starting', health_status = 'unknown', host = :host,
           service_name = :name, service_index = :index, command = :command, cwd = :cwd,
           port = :port, url = :url, started_by_run_id = :run_id, pid = NULL, pgid = NULL,
           create_time = NULL, log_path = NULL, last_error = NULL, started_at = NULL,
           stopped_at = NULL, updated_at = now()
     WHERE id = :id
    RETURNING *
    """
)
_RECORD_SPAWN = sql(
    """
    UPDATE workspaces.runtime_services
       SET pid = :pid, pgid = :pgid, create_time = :create_time, log_path = :log_path,
           started_at = now(), updated_at = now()
     WHERE id = :id AND status = 'starting' AND pid IS NULL
    RETURNING *
    """
)
_MARK_RUNNING = sql(
    """
    UPDATE workspaces.runtime_services
       SET status = 'running', health_status = 'healthy', updated_at = now()
     WHERE id = :id AND pid = :pid AND status IN ('starting', 'running')
    RETURNING *
    """
)
_MARK_ENDED = sql(
    """
    UPDATE workspaces.runtime_services
       SET status = :status, health_status = :health, last_error = :last_error,
           stopped_at = now(), updated_at = now()
     WHERE id = :id AND status IN ('starting', 'running')
       AND (:pid::integer IS NULL OR pid = :pid::integer)
    RETURNING *
    """
)
_LIVE_ON_HOST = sql(
    """
    SELECT * FROM workspaces.runtime_services
     WHERE host = :host AND status IN ('starting', 'running')
     ORDER BY started_at NULLS FIRST, id
    """
)
_LIVE_IN_WORKSPACE = sql(
    """
    SELECT * FROM workspaces.runtime_services
     WHERE workspace_id = :workspace_id AND status IN ('starting', 'running')
     ORDER BY service_index, workspace_command_id
    """
)
_RESTARTABLE_WORKSPACES = sql(
    f"""
    SELECT w.id FROM workspaces.execution_workspaces w
      {foreign_reads.SOURCE_ISSUE_LEFT_JOIN}
     WHERE w.status = ANY(:statuses::text[]) AND w.config IS NOT NULL
       AND NOT (w.mode = 'isolated_workspace' AND coalesce(i.status, '') IN ('done', 'cancelled'))
       AND EXISTS (
           SELECT 1 FROM workspaces.runtime_services s
            WHERE s.workspace_id = w.id AND s.host = :host
              AND s.status NOT IN ('starting', 'running'))
     ORDER BY w.id
    """
)
_CLOSED_ISSUE_SERVICES = sql(
    f"""
    SELECT s.* FROM workspaces.runtime_services s
      JOIN workspaces.execution_workspaces w ON w.id = s.workspace_id
      {foreign_reads.SOURCE_ISSUE_JOIN}
     WHERE s.host = :host AND s.status IN ('starting', 'running')
       AND w.mode = 'isolated_workspace' AND i.status IN ('done', 'cancelled')
     ORDER BY s.workspace_id, s.service_index
     LIMIT :limit
    """
)
# The recorder's rows of operations that were running in a process that is gone.
_FAIL_INTERRUPTED_OPERATIONS = sql(
    """
    UPDATE workspaces.workspace_operations
       SET status = 'failed', stderr = stderr || :note,
           stderr_excerpt = right(stderr || :note, 4096),
           stderr_bytes = octet_length(stderr || :note),
           stderr_sha256 = encode(sha256(convert_to(stderr || :note, 'UTF8')), 'hex'),
           finished_at = clock_timestamp()
     WHERE host = :host AND status = 'running' AND started_at < :before
    """
)
_TRY_HOST_LOCK = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
_HOST_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended($1, 0))"


def _record(row: asyncpg.Record | None) -> RuntimeServiceRecord | None:
    return None if row is None else RuntimeServiceRecord.from_row(row)


def is_port_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is the port reservation refusing a second holder."""
    return (
        isinstance(exc, asyncpg.UniqueViolationError)
        and getattr(exc, "constraint_name", None) == PORT_INDEX
    )


async def upsert_service(
    tx: Tx, *, workspace: WorkspaceRecord, command: CommandDef, cwd: str, host: str
) -> RuntimeServiceRecord:
    """The row of (workspace, command), inserted ``stopped`` if there is none yet."""
    row = await tx.fetchrow(
        _UPSERT,
        {
            "company_id": workspace.company_id,
            "workspace_id": workspace.id,
            "command_id": command.id,
            "name": command.name,
            "index": command.service_index or 0,
            "command": command.command,
            "cwd": cwd,
            "host": host,
        },
    )
    assert row is not None
    return RuntimeServiceRecord.from_row(row)


async def get_service(tx: Tx, service_id: str) -> RuntimeServiceRecord | None:
    """The row ``service_id`` as it is now, or None."""
    return _record(await tx.fetchrow(_GET, {"id": service_id}))


async def mark_starting(
    tx: Tx,
    service_id: str,
    *,
    host: str,
    command: CommandDef,
    command_line: str,
    cwd: str,
    port: int | None,
    url: str | None,
    run_id: str | None,
) -> RuntimeServiceRecord:
    """``starting`` with ``port`` reserved and no process yet. Raises
    ``asyncpg.UniqueViolationError`` (see ``is_port_conflict``) when the port is taken."""
    row = await tx.fetchrow(
        _MARK_STARTING,
        {
            "id": service_id,
            "host": host,
            "name": command.name,
            "index": command.service_index or 0,
            "command": command_line,
            "cwd": cwd,
            "port": port,
            "url": url,
            "run_id": run_id,
        },
    )
    assert row is not None
    return RuntimeServiceRecord.from_row(row)


async def record_spawn(
    tx: Tx, service_id: str, *, pid: int, pgid: int, create_time: float, log_path: str
) -> RuntimeServiceRecord | None:
    """The spawned process of a ``starting`` row; None if the row was stopped meanwhile."""
    params = {
        "id": service_id,
        "pid": pid,
        "pgid": pgid,
        "create_time": create_time,
        "log_path": log_path,
    }
    return _record(await tx.fetchrow(_RECORD_SPAWN, params))


async def mark_running(tx: Tx, service_id: str, *, pid: int) -> RuntimeServiceRecord | None:
    """``running``/``healthy``, if the row is still live with process ``pid``."""
    return _record(await tx.fetchrow(_MARK_RUNNING, {"id": service_id, "pid": pid}))


async def mark_ended(
    tx: Tx,
    service_id: str,
    *,
    status: str,
    health: str,
    last_error: str | None,
    pid: int | None = None,
) -> RuntimeServiceRecord | None:
    """``stopped`` or ``failed`` with ``stopped_at`` (the port is released), if the row
    is live (and, given ``pid``, still that process's); None otherwise."""
    params = {
        "id": service_id,
        "status": status,
        "health": health,
        "last_error": last_error,
        "pid": pid,
    }
    return _record(await tx.fetchrow(_MARK_ENDED, params))


async def live_on_host(tx: Tx, host: str) -> list[RuntimeServiceRecord]:
    """Every starting or running service recorded on ``host``."""
    return [RuntimeServiceRecord.from_row(r) for r in await tx.fetch(_LIVE_ON_HOST, {"host": host})]


async def live_in_workspace(tx: Tx, workspace_id: str) -> list[RuntimeServiceRecord]:
    """Every starting or running service of a workspace, on any host."""
    rows = await tx.fetch(_LIVE_IN_WORKSPACE, {"workspace_id": workspace_id})
    return [RuntimeServiceRecord.from_row(r) for r in rows]


async def restartable_workspace_ids(tx: Tx, host: str) -> list[str]:
    """Open (or cleanup-failed) workspaces with a config and a service that ran on
    ``host`` and is not live; isolated workspaces of closed issues are left out."""
    rows = await tx.fetch(
        _RESTARTABLE_WORKSPACES, {"host": host, "statuses": list(RESTARTABLE_STATUSES)}
    )
    return [str(r["id"]) for r in rows]


async def closed_issue_services(tx: Tx, *, host: str, limit: int) -> list[RuntimeServiceRecord]:
    """Live services on ``host`` of isolated workspaces whose issue is done or cancelled."""
    rows = await tx.fetch(_CLOSED_ISSUE_SERVICES, {"host": host, "limit": limit})
    return [RuntimeServiceRecord.from_row(r) for r in rows]


async def fail_interrupted_operations(tx: Tx, *, host: str, before: datetime, note: str) -> int:
    """Mark ``failed`` (``note`` appended to stderr) the operations of ``host`` still
    ``running`` that started before ``before``; how many."""
    status = await tx.execute(
        _FAIL_INTERRUPTED_OPERATIONS, {"host": host, "before": before, "note": note}
    )
    return int(status.rsplit(" ", 1)[-1])


@asynccontextmanager
async def host_lock(db: Database, host: str, *, retry_seconds: float = 1.0) -> AsyncIterator[None]:
    """Hold the session advisory lock of ``host`` (one start-up pass per host at a time).

    Taken with try-and-retry on a connection outside any transaction: a plain blocking
    lock would hit the statement timeout while another pass restarts services, and a
    transaction held open for the whole pass would pin the database's vacuum horizon.
    """
    key = f"workspace-runtime:{host}"
    async with db.engine.connect() as conn:
        pooled = await conn.get_raw_connection()
        driver: asyncpg.Connection = pooled.driver_connection  # type: ignore[assignment]
        # Polled: the holder is another process, so nothing here could signal an Event.
        while not await driver.fetchval(_TRY_HOST_LOCK, key):  # noqa: ASYNC110
            await asyncio.sleep(retry_seconds)
        try:
            yield
        finally:
            # A closed session releases its locks: a failed unlock drops the connection.
            try:
                await driver.execute(_HOST_UNLOCK, key)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.invalidate()
            except asyncio.CancelledError:
                await conn.invalidate()
                raise
