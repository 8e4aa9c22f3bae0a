"""The start-up pass of a workspace-service process (scenario 29): judge the runtime
services an earlier process of this host left recorded, then bring back those that
should run.

- **Reconcile.** Each ``starting``/``running`` row of this host that no process here
  watches: a live process (pid + create time) that is healthy (its readiness URL
  answers 2xx, and no process outside its tree holds its port) is adopted and watched;
  otherwise what is left of its group is killed and the row marked ``stopped`` with
  ``stopped_at``. Operations of this host left ``running`` by an earlier process are
  marked ``failed`` ("workspace service restarted").
- **Restart.** Services whose desired state is running, that last ran on this host and
  are not live, in active/idle/in_review/cleanup_failed workspaces (not isolated
  workspaces of closed issues: the reaper holds those stopped), each start recorded as
  an operation of the system. A failed start is logged, never fatal.

Only rows of *this host* are judged: a row names its host, and another host's processes
cannot be checked from here. A service that never ran anywhere is not started here:
the rows say which host a service belongs to. Two processes on one host run the pass
one at a time (a session advisory lock keyed by the host).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import asyncpg
import psutil

from common.actor import SYSTEM_ACTOR
from common.db import Database
from common.errors import PaperclipError
from workspace_service import commands, store
from workspace_service import runtime_store as rows
from workspace_service.commands import CommandDef
from workspace_service.environment import render, template_values
from workspace_service.model import RuntimeServiceRecord, WorkspaceRecord
from workspace_service.readiness import adoption_refusal
from workspace_service.recorder import Operation, OperationContext, Recorder
from workspace_service.service_process import kill_recorded_tree
from workspace_service.workspace_config import service_state


class RuntimeSupervisor(Protocol):
    """What start-up needs of the host's supervisor (``runtime_services``)."""

    @property
    def db(self) -> Database: ...

    host: str

    def serialized(
        self, workspace_id: str, command_id: str
    ) -> AbstractAsyncContextManager[None]: ...

    def supervises(self, service_id: str) -> bool: ...

    def adopt(self, row: RuntimeServiceRecord) -> None: ...

    async def start_service(
        self,
        workspace: WorkspaceRecord,
        command: CommandDef,
        *,
        op: Operation,
        started_by_run_id: str | None = None,
    ) -> RuntimeServiceRecord: ...


logger = logging.getLogger(__name__)

RESTART_NOTE = "workspace service restarted"
#: Wait before retrying a start-up pass that failed (the database was unreachable).
RETRY_S = 5.0
#: Operations still ``running`` that started before this process belong to a process
#: that is gone (this process's own operations started after it).
_PROCESS_STARTED = datetime.fromtimestamp(psutil.Process().create_time(), UTC)


@dataclass(frozen=True)
class ReconcileResult:
    """Live rows of this host judged, adopted, and stopped."""

    reconciled: int
    adopted: int
    stopped: int


async def run_startup(supervisor: RuntimeSupervisor) -> None:
    """Reconcile then restart, under the host's advisory lock; retried until done."""
    while True:
        try:
            async with rows.host_lock(supervisor.db, supervisor.host):
                result = await reconcile(supervisor)
                restarted = await restart_desired(supervisor)
        except (PaperclipError, asyncpg.PostgresError, OSError):
            logger.exception("runtime service start-up pass failed; retrying")
            await asyncio.sleep(RETRY_S)
            continue
        logger.info(
            "runtime services reconciled",
            extra={
                "reconciled": result.reconciled,
                "adopted": result.adopted,
                "stopped": result.stopped,
                "restarted": restarted,
            },
        )
        return


async def reconcile(supervisor: RuntimeSupervisor) -> ReconcileResult:
    """Adopt or clear each live row of this host that no process here watches."""
    db, host = supervisor.db, supervisor.host
    async with db.unit_of_work() as tx:
        await rows.fail_interrupted_operations(
            tx, host=host, before=_PROCESS_STARTED, note=RESTART_NOTE
        )
        recorded = await rows.live_on_host(tx, host)
    reconciled = adopted = 0
    for row in recorded:
        # Under the service's lock: a start of this process may be at it right now.
        async with supervisor.serialized(row.workspace_id, row.workspace_command_id):
            async with db.unit_of_work() as tx:
                current = await rows.get_service(tx, row.id)
            if current is None or not current.is_live or supervisor.supervises(current.id):
                continue
            reconciled += 1
            refusal = await adoption_refusal(current, await _health_url(supervisor, current))
            if refusal is None:
                async with db.unit_of_work() as tx:
                    running = await rows.mark_running(tx, current.id, pid=current.pid or 0)
                if running is not None:
                    supervisor.adopt(running)
                    adopted += 1
                    continue
                refusal = "its row changed meanwhile"
            await kill_recorded_tree(current)
            async with db.unit_of_work() as tx:
                await rows.mark_ended(
                    tx,
                    current.id,
                    status="stopped",
                    health="unknown",
                    last_error=f"not adopted after a restart: {refusal}",
                )
    return ReconcileResult(reconciled, adopted, reconciled - adopted)


async def _health_url(supervisor: RuntimeSupervisor, row: RuntimeServiceRecord) -> str | None:
    """The readiness URL of the row's command as configured now, else the row's URL."""
    async with supervisor.db.unit_of_work() as tx:
        workspace = await store.get_workspace(tx, row.workspace_id)
    command = commands.find(workspace.config, row.workspace_command_id) if workspace else None
    if workspace is None or command is None:
        return row.url
    values = template_values(workspace, port=row.port)
    return render(command.readiness.url or command.url, values) or None


async def restart_desired(supervisor: RuntimeSupervisor) -> int:
    """Start each desired-running service of this host that is not live; how many."""
    async with supervisor.db.unit_of_work() as tx:
        workspace_ids = await rows.restartable_workspace_ids(tx, supervisor.host)
    started = 0
    for workspace_id in workspace_ids:
        async with supervisor.db.unit_of_work() as tx:
            workspace = await store.get_workspace(tx, workspace_id)
            recorded = await store.runtime_services(tx, workspace_id)
        if workspace is None:
            continue
        by_command = {r.workspace_command_id: r for r in recorded}
        for command in commands.services(workspace.config):
            row = by_command.get(command.id)
            if row is None or row.host != supervisor.host or row.is_live:
                continue
            if service_state(workspace.config, command.service_index or 0) == "running":
                started += await _start_recorded(supervisor, workspace, command)
    return started


async def _start_recorded(
    supervisor: RuntimeSupervisor, workspace: WorkspaceRecord, command: CommandDef
) -> int:
    """1 if the start, recorded as an operation of the system, succeeded; else 0."""
    recorder = Recorder(
        supervisor.db,
        OperationContext(
            company_id=workspace.company_id,
            actor=SYSTEM_ACTOR,
            host=supervisor.host,
            workspace_id=workspace.id,
            issue_id=workspace.source_issue_id,
        ),
    )
    metadata = {"action": "start", "reason": "startup", "workspaceCommandId": command.id}
    try:
        async with recorder.operation(
            "workspace_provision", command.command, cwd=workspace.cwd, metadata=metadata
        ) as op:
            await supervisor.start_service(workspace, command, op=op)
    except (PaperclipError, asyncpg.PostgresError, OSError) as exc:
        logger.warning("restarting runtime service %s failed: %s", command.id, exc)
        return 0
    return 1
