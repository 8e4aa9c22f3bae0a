"""The runtime services of this host's workspaces: supervised process
groups with a reserved port, a readiness check, a watcher, a tree-wide stop, and
adoption after the workspace service restarts.

A start is serialized per (workspace, command) in this process. Its row is written
``starting`` with its port *before* anything spawns: the database's unique index on
(host, port) of live rows is the port reservation, so two workspaces never share a
port, and a crash mid-start leaves a row the next start-up pass can judge. The spawned
process is recorded (pid, group, create time) before readiness is awaited.

Every process this supervisor started or adopted is in ``_supervised`` until it ends or
is stopped. ``shutdown`` stops them all but leaves their desired state alone, so the
next ``startup`` (``runtime_startup``: adopt or clear what is recorded, then restart
what should run) brings them back.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from common.config import Settings
from common.db import Database
from common.errors import FailedPrecondition, PaperclipError, Unavailable
from supervision.process_tree import kill_tree, process_alive
from workspace_service import runtime_startup
from workspace_service import runtime_store as rows
from workspace_service.commands import CommandDef
from workspace_service.environment import render, sanitized_env, template_values
from workspace_service.keyed_locks import KeyedLocks
from workspace_service.model import RuntimeServiceRecord, WorkspaceRecord
from workspace_service.ports import reserve_port
from workspace_service.readiness import NotReadyError, wait_until_ready
from workspace_service.recorder import Operation
from workspace_service.runtime_startup import ReconcileResult
from workspace_service.service_process import (
    KILL_GRACE_S,
    SpawnError,
    Supervised,
    exited_cleanly,
    kill_recorded_tree,
    log_path_for,
    log_tail,
    spawn_service,
)

__all__ = ["OTHER_HOST", "SHUTDOWN_NOTE", "START_FAILED", "ReconcileResult", "RuntimeSupervisor"]

logger = logging.getLogger(__name__)

START_FAILED = "RUNTIME_SERVICE_START_FAILED"
OTHER_HOST = "RUNTIME_SERVICE_ON_OTHER_HOST"
SHUTDOWN_NOTE = "workspace service stopped"


class RuntimeSupervisor:
    """Starts, stops, watches and adopts runtime service processes on this host."""

    def __init__(self, db: Database, settings: Settings, host: str) -> None:
        self._db = db
        self._settings = settings
        self.host = host
        self._supervised: dict[str, Supervised] = {}
        self._locks = KeyedLocks()
        self._closed = False

    # -- start ---------------------------------------------------------------------------

    async def start_service(
        self,
        workspace: WorkspaceRecord,
        command: CommandDef,
        *,
        op: Operation,
        started_by_run_id: str | None = None,
    ) -> RuntimeServiceRecord:
        """Start service ``command`` of ``workspace`` here and wait until it is ready;
        if its process already runs here, return its row.

        Raises FailedPrecondition: ``RUNTIME_PORT_IN_USE`` (nothing started),
        ``RUNTIME_SERVICE_START_FAILED`` (its tree is stopped, the row ``failed``),
        ``RUNTIME_SERVICE_ON_OTHER_HOST``.
        """
        if self._closed:
            raise Unavailable("the workspace service is stopping", reason="UNAVAILABLE")
        if command.kind != "service":
            raise ValueError(f"{command.id} is a job, not a service")
        if not workspace.cwd:
            raise _start_failed(command.name, "the workspace has no directory")
        cwd = _service_cwd(workspace.cwd, command.cwd)
        async with self.serialized(workspace.id, command.id):
            async with self._db.unit_of_work() as tx:
                row = await rows.upsert_service(
                    tx, workspace=workspace, command=command, cwd=cwd, host=self.host
                )
            if row.is_live:
                if row.host != self.host:
                    raise self._on_other_host(row)
                if _alive(row):
                    if row.id not in self._supervised:
                        self.adopt(row)
                    op.note(f"{row.service_name} is already running (pid {row.pid})")
                    return row
                await kill_recorded_tree(row)  # leftovers of a process that is gone
            row = await self._reserve(workspace, command, row, cwd, started_by_run_id)
            return await self._launch(workspace, command, row, op)

    async def _reserve(
        self,
        workspace: WorkspaceRecord,
        command: CommandDef,
        row: RuntimeServiceRecord,
        cwd: str,
        run_id: str | None,
    ) -> RuntimeServiceRecord:
        """The row written ``starting`` with its port reserved."""

        async def write(port: int | None) -> RuntimeServiceRecord:
            values = template_values(workspace, port=port)
            async with self._db.unit_of_work() as tx:
                return await rows.mark_starting(
                    tx,
                    row.id,
                    host=self.host,
                    command=command,
                    command_line=render(command.command, values),
                    cwd=cwd,
                    port=port,
                    url=render(command.url or command.readiness.url, values) or None,
                    run_id=run_id,
                )

        return await reserve_port(command, previous=row.port, write=write)

    async def _launch(
        self,
        workspace: WorkspaceRecord,
        command: CommandDef,
        row: RuntimeServiceRecord,
        op: Operation,
    ) -> RuntimeServiceRecord:
        """Spawn the reserved row's process, record it, wait for readiness."""
        values = template_values(workspace, port=row.port)
        env = _service_env(command, row, values)
        log_path = log_path_for(self._settings.home, row.id)
        try:
            proc = await spawn_service(command=row.command, cwd=row.cwd, env=env, log_path=log_path)
        except SpawnError as exc:
            error = _start_failed(command.name, str(exc), service_id=row.id)
            await self._mark(row.id, "failed", "unhealthy", error.message)
            raise error from exc
        entry = Supervised(
            row.id, command.name, proc.pid, proc.pgid, proc.create_time, str(log_path), proc.exited
        )
        self._supervised[row.id] = entry
        try:
            if self._closed:  # shutdown ran during the spawn and did not see this process
                raise NotReadyError("the workspace service is stopping")
            async with self._db.unit_of_work() as tx:
                spawned = await rows.record_spawn(
                    tx,
                    row.id,
                    pid=proc.pid,
                    pgid=proc.pgid,
                    create_time=proc.create_time,
                    log_path=str(log_path),
                )
            if spawned is None:
                raise NotReadyError("it was stopped while starting")
            await wait_until_ready(
                render(command.readiness.url or command.url, values) or None,
                within=command.ready_timeout(),
                interval=command.ready_interval(),
                exited=proc.exited,
            )
            async with self._db.unit_of_work() as tx:
                running = await rows.mark_running(tx, row.id, pid=proc.pid)
            if running is None:
                raise NotReadyError("it was stopped while starting")
        except NotReadyError as exc:
            raise await self._abort_start(entry, str(exc)) from None
        except BaseException:
            await asyncio.shield(self._abort_start(entry, "the start was interrupted"))
            raise
        entry.watcher = asyncio.create_task(self._watch(entry), name=f"watch-{proc.pid}")
        _report_started(op, command, running, proc.pid)
        return running

    async def _abort_start(self, entry: Supervised, reason: str) -> FailedPrecondition:
        """Stop what a failed start spawned and record the failure (unless a stop took
        the service over: it records the end); the error to raise."""
        taken_over = entry.stopping
        await entry.stop(KILL_GRACE_S)
        self._forget(entry)
        if taken_over:
            reason = "it was stopped while starting"
        error = _start_failed(
            entry.name, reason, tail=log_tail(entry.log_path), service_id=entry.service_id
        )
        if not taken_over:
            # No pid guard: the row is ours while the start holds its lock.
            await self._mark(entry.service_id, "failed", "unhealthy", error.message)
        logger.warning("runtime service failed to start", extra={"error": error.message})
        return error

    # -- watch ---------------------------------------------------------------------------

    async def _watch(self, entry: Supervised) -> None:
        """Record the end of a process that ends by itself (unless it is being stopped),
        after stopping what is left of its group."""
        code, what = await entry.wait_end()
        if entry.stopping:
            return
        self._forget(entry)
        clean = code is None or exited_cleanly(code)
        status, health = ("stopped", "unknown") if clean else ("failed", "unhealthy")
        error = None
        if code != 0:
            tail = "" if clean else log_tail(entry.log_path)
            error = _with_tail(f'Runtime service "{entry.name}" {what}', tail)
        try:
            await kill_tree(entry.pid, entry.pgid, entry.create_time, KILL_GRACE_S)
            await self._mark(entry.service_id, status, health, error, pid=entry.pid)
        except (PaperclipError, asyncpg.PostgresError, OSError):
            logger.exception("recording the end of a runtime service failed")
        logger.info("runtime service ended", extra={"runtime_service_id": entry.service_id})

    # -- stop ----------------------------------------------------------------------------

    async def stop_service(
        self, service: RuntimeServiceRecord, *, reason: str, op: Operation | None = None
    ) -> RuntimeServiceRecord:
        """Stop the service's process tree (TERM, grace, KILL) and mark its row
        ``stopped`` (its port released). A row no longer live is returned as it is."""
        if service.host != self.host:
            raise self._on_other_host(service)
        starting = self._supervised.get(service.id)
        if starting is not None and starting.watcher is None:
            # A start is waiting for readiness while holding the lock: end its process
            # so it gives up now rather than at its readiness timeout.
            await starting.stop(KILL_GRACE_S)
        async with self.serialized(service.workspace_id, service.workspace_command_id):
            async with self._db.unit_of_work() as tx:
                current = await rows.get_service(tx, service.id)
            if current is None or not current.is_live:
                return current or service
            await self._terminate(current)
            async with self._db.unit_of_work() as tx:
                ended = await rows.mark_ended(
                    tx, current.id, status="stopped", health="unknown", last_error=None
                )
                ended = ended or await rows.get_service(tx, current.id)
        logger.info("runtime service stopped", extra={"runtime_service_id": current.id})
        if op is not None:
            op.note(f"Stopped {current.service_name} ({reason})")
        return ended or current

    async def stop_workspace(
        self, workspace_id: str, *, reason: str, op: Operation | None = None
    ) -> list[RuntimeServiceRecord]:
        """Stop every starting or running service of the workspace. Nothing is stopped
        if one of them runs on another host (``RUNTIME_SERVICE_ON_OTHER_HOST``)."""
        async with self._db.unit_of_work() as tx:
            live = await rows.live_in_workspace(tx, workspace_id)
        elsewhere = [row for row in live if row.host != self.host]
        if elsewhere:
            raise self._on_other_host(elsewhere[0])
        return list(
            await asyncio.gather(*(self.stop_service(r, reason=reason, op=op) for r in live))
        )

    async def shutdown(self) -> None:
        """Stop every process this supervisor started or adopted (this process is going
        away); rows ``stopped`` with "workspace service stopped", desired state kept."""
        self._closed = True
        entries = list(self._supervised.values())
        self._supervised.clear()
        await asyncio.gather(*(self._stop_for_shutdown(e) for e in entries))

    async def _stop_for_shutdown(self, entry: Supervised) -> None:
        try:
            await entry.stop(KILL_GRACE_S)
            await self._mark(entry.service_id, "stopped", "unknown", SHUTDOWN_NOTE, pid=entry.pid)
        except (PaperclipError, asyncpg.PostgresError, OSError):
            logger.exception("stopping a runtime service at shutdown failed")

    async def _terminate(self, row: RuntimeServiceRecord) -> None:
        """Stop the process tree of ``row``: supervised here, or only recorded."""
        entry = self._supervised.pop(row.id, None)
        if entry is not None:
            await entry.stop(KILL_GRACE_S)
        else:
            await kill_recorded_tree(row)

    # -- start-up (runtime_startup) ------------------------------------------------------

    async def startup(self) -> None:
        """The start-up pass: ``reconcile`` then ``restart_desired``, under this host's
        advisory lock, retried until it completes (see ``runtime_startup``)."""
        await runtime_startup.run_startup(self)

    async def reconcile(self) -> ReconcileResult:
        """Adopt or clear this host's recorded live services (see ``runtime_startup``)."""
        return await runtime_startup.reconcile(self)

    async def restart_desired(self) -> int:
        """Start what should run and is not live; how many (see ``runtime_startup``)."""
        return await runtime_startup.restart_desired(self)

    @property
    def db(self) -> Database:
        """The database the rows of this supervisor's services live in."""
        return self._db

    def supervises(self, service_id: str) -> bool:
        """Whether a process of runtime service ``service_id`` is watched here."""
        return service_id in self._supervised

    def adopt(self, row: RuntimeServiceRecord) -> None:
        """Watch the recorded, live process of ``row`` (not our child) until it ends."""
        assert row.pid is not None and row.create_time is not None
        entry = Supervised(
            row.id, row.service_name, row.pid, row.pgid or row.pid, row.create_time, row.log_path
        )
        entry.watcher = asyncio.create_task(self._watch(entry), name=f"adopted-{row.pid}")
        self._supervised[row.id] = entry

    # -- helpers -------------------------------------------------------------------------

    @asynccontextmanager
    async def serialized(self, workspace_id: str, command_id: str) -> AsyncIterator[None]:
        """Hold the in-process lock of a (workspace, command): one start, stop or
        start-up judgement of a service at a time."""
        async with self._locks.hold(f"{workspace_id}/{command_id}"):
            yield

    def _forget(self, entry: Supervised) -> None:
        if self._supervised.get(entry.service_id) is entry:
            del self._supervised[entry.service_id]

    async def _mark(
        self,
        service_id: str,
        status: str,
        health: str,
        last_error: str | None,
        *,
        pid: int | None = None,
    ) -> None:
        async with self._db.unit_of_work() as tx:
            await rows.mark_ended(
                tx, service_id, status=status, health=health, last_error=last_error, pid=pid
            )

    def _on_other_host(self, row: RuntimeServiceRecord) -> FailedPrecondition:
        return FailedPrecondition(
            f'runtime service "{row.service_name}" runs on host {row.host}, not {self.host}',
            reason=OTHER_HOST,
            metadata={"runtime_service_id": row.id, "host": row.host},
        )


def _service_cwd(workspace_cwd: str, command_cwd: str) -> str:
    """The command's directory: relative to the workspace's, or absolute."""
    return os.path.normpath(os.path.join(workspace_cwd, command_cwd or "."))


def _alive(row: RuntimeServiceRecord) -> bool:
    return (
        row.pid is not None
        and row.create_time is not None
        and process_alive(row.pid, row.create_time)
    )


def _start_failed(
    name: str, reason: str, *, tail: str = "", service_id: str | None = None
) -> FailedPrecondition:
    """``RUNTIME_SERVICE_START_FAILED``: "Failed to start runtime service "<name>":
    <reason> | stderr: <tail>"."""
    message = _with_tail(f'Failed to start runtime service "{name}": {reason}', tail)
    metadata = {"runtime_service_id": service_id} if service_id else {}
    return FailedPrecondition(message, reason=START_FAILED, metadata=metadata)


def _with_tail(message: str, tail: str) -> str:
    """``message`` followed by the end of the service's log, when there is one."""
    return f"{message} | stderr: {tail}" if tail else message


def _service_env(
    command: CommandDef, row: RuntimeServiceRecord, values: dict[str, str]
) -> dict[str, str]:
    """The service process's environment: the sanitized one, the command's rendered
    variables and its port."""
    env = sanitized_env()
    env.update({key: render(value, values) for key, value in command.env.items()})
    if row.port is not None:
        env[command.port_env] = str(row.port)
    return env


def _report_started(
    op: Operation, command: CommandDef, running: RuntimeServiceRecord, pid: int
) -> None:
    """The operation's notes and the log line of a service that became ready."""
    on_port = f" on port {running.port}" if running.port is not None else ""
    op.note(f"Started {command.name}{on_port} (pid {pid})")
    if running.url:
        op.note(f"{command.name}: {running.url}")
    logger.info(
        "runtime service started",
        extra={"runtime_service_id": running.id, "pid": pid, "port": running.port},
    )
