"""ControlRuntimeServices: start, stop or restart a workspace's runtime
services, or run one of its jobs, as one recorded operation.

Checks run in this order, each refusal with its own reason and nothing written: the
request's fields, the workspace (NOT_FOUND), the caller (``access``), an open
workspace with a path, then the targets (``runtime_targets``). Then one operation
is recorded around the work: the workspace is made available (re-attached and
provisioned) before a start, restart or run; a job runs as a nested operation; the
desired state is patched (``workspace_config.desired_state_patch``) unless the target
was named by its runtime record only.
A failed start stops what this operation started and writes those services' desired
state stopped, so a broken service is not restarted at every boot.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any, Literal

from common.actor import Actor
from common.audit import record_activity
from common.errors import FailedPrecondition, PaperclipError
from common.validation import Violations
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from workspace_service import access, operation_store, operations, provisioning, store
from workspace_service.commands import CommandDef
from workspace_service.environment import render, sanitized_env, template_values, workspace_env
from workspace_service.model import RuntimeServiceRecord, WorkspaceRecord
from workspace_service.recorder import Operation, Recorder
from workspace_service.runtime_targets import Action, Selection, select
from workspace_service.service_context import ServiceContext
from workspace_service.workspace_config import desired_state_patch, merge_config
from workspace_service.workspaces import load_workspace, optional_uuid, workspace_proto

_ACTIONS: dict[int, Action] = {
    pb.RUNTIME_ACTION_START: "start",
    pb.RUNTIME_ACTION_STOP: "stop",
    pb.RUNTIME_ACTION_RESTART: "restart",
    pb.RUNTIME_ACTION_RUN: "run",
}
_DONE = {"start": "Started", "stop": "Stopped", "restart": "Restarted"}


async def control_runtime_services(
    ctx: ServiceContext, actor: Actor, request: pb.ControlRuntimeServicesRequest
) -> pb.ControlRuntimeServicesResponse:
    """Run the action; the workspace after it and the operation that recorded it."""
    action, workspace_id, runtime_service_id, service_index = _parse(request)
    async with ctx.locks.hold(f"workspace:{workspace_id}"):
        async with ctx.db.unit_of_work() as tx:
            workspace = await load_workspace(tx, workspace_id)
            await access.require_manage(
                tx, actor, company_id=workspace.company_id, issue_id=workspace.source_issue_id
            )
            records = await store.runtime_services(tx, workspace_id)
        if not workspace.is_open:
            raise FailedPrecondition(
                f"the workspace is closed ({workspace.status})",
                reason="WORKSPACE_CLOSED",
                metadata={"workspace_id": workspace_id, "status": workspace.status},
            )
        selection = select(
            workspace,
            action=action,
            command_id=request.workspace_command_id,
            runtime_service_id=runtime_service_id,
            service_index=service_index,
            records=records,
        )
        operation_id = await _execute(ctx, actor, workspace, selection)
    async with ctx.db.unit_of_work() as tx:
        workspace = await load_workspace(tx, workspace_id)
        row = await operation_store.load_operation(tx, operation_id)
        assert row is not None
        return pb.ControlRuntimeServicesResponse(
            workspace=await workspace_proto(tx, workspace),
            operation=operations.operation_proto(row, with_output=True),
        )


def _parse(request: pb.ControlRuntimeServicesRequest) -> tuple[Action, str, str | None, int | None]:
    v = Violations()
    action = _ACTIONS.get(request.action)
    if action is None:
        v.add("action", "must be RUNTIME_ACTION_START, _STOP, _RESTART or _RUN")
    workspace_id = optional_uuid(v, "workspace_id", request.workspace_id, required=True)
    runtime_service_id = optional_uuid(v, "runtime_service_id", request.runtime_service_id)
    index = request.service_index if request.HasField("service_index") else None
    if index is not None and index < 0:
        v.add("service_index", "must not be negative")
    if len(request.workspace_command_id) > 200:
        v.add("workspace_command_id", "must be at most 200 characters")
    v.raise_if_any()
    assert action is not None and workspace_id is not None
    return action, workspace_id, runtime_service_id, index


async def _execute(
    ctx: ServiceContext, actor: Actor, workspace: WorkspaceRecord, selection: Selection
) -> str:
    """Record and run the action; the id of the outer operation."""
    recorder = ctx.recorder(
        actor,
        company_id=workspace.company_id,
        workspace_id=workspace.id,
        issue_id=workspace.source_issue_id,
    )
    command = selection.command
    metadata: dict[str, Any] = {
        "action": selection.action,
        "workspaceCommandId": command.id if command else None,
        "commandKind": command.kind if command else None,
        "commandName": command.name if command else None,
        "runtimeServiceId": selection.service_record.id if selection.service_record else None,
        "serviceIndex": selection.index,
    }
    phase = "workspace_teardown" if selection.action == "stop" else "workspace_provision"
    text = command.command if command else f"workspace command {selection.action}"
    failure: PaperclipError | None = None
    async with recorder.operation(phase, text, cwd=workspace.cwd, metadata=metadata) as op:
        try:
            await _run_action(ctx, recorder, workspace, selection, op)
        except PaperclipError as exc:
            op.status = "failed"
            op.stderr.write_text(exc.message)
            exc.metadata.setdefault("operation_id", op.id)
            failure = exc
    async with ctx.db.unit_of_work() as tx:
        record_activity(
            tx,
            actor=actor,
            company_id=workspace.company_id,
            action=f"execution_workspace.runtime_{selection.action}",
            entity_type="execution_workspace",
            entity_id=workspace.id,
            details={**metadata, "operationId": op.id, "status": op.final_status},
        )
    if failure is not None:
        raise failure
    return op.id


async def _run_action(
    ctx: ServiceContext,
    recorder: Recorder,
    workspace: WorkspaceRecord,
    selection: Selection,
    op: Operation,
) -> None:
    action = selection.action
    if action in ("start", "restart", "run"):
        for warning in await provisioning.ensure_available(recorder, workspace):
            op.note(f"warning: {warning}")
    if action == "run":
        assert selection.command is not None
        await _run_job(recorder, workspace, selection.command, op)
        return
    if action in ("stop", "restart"):
        stopped = await _stop(ctx, workspace, selection, op)
        op.metadata["stoppedCount"] = len(stopped)
    started: list[RuntimeServiceRecord] = []
    if action in ("start", "restart"):
        try:
            for service in selection.targets:
                started.append(await ctx.runtime.start_service(workspace, service, op=op))
        except PaperclipError:
            for record in started:
                await ctx.runtime.stop_service(
                    record, reason="a start in the same operation failed"
                )
            await _write_desired_state(ctx, workspace.id, selection, failed=True)
            raise
    await _write_desired_state(ctx, workspace.id, selection, failed=False)
    op.metadata["runtimeServiceCount"] = len(started) if started else len(selection.targets)
    op.note(f"{_DONE[action]} execution workspace runtime services.")


async def _stop(
    ctx: ServiceContext, workspace: WorkspaceRecord, selection: Selection, op: Operation
) -> list[RuntimeServiceRecord]:
    if selection.index is None and selection.service_record is None:
        return await ctx.runtime.stop_workspace(workspace.id, reason="stopped by request", op=op)
    async with ctx.db.unit_of_work() as tx:
        records = await store.runtime_services(tx, workspace.id)
    wanted = [
        r
        for r in records
        if r.is_live
        and (
            (selection.service_record is not None and r.id == selection.service_record.id)
            or (selection.service_record is None and r.service_index == selection.index)
        )
    ]
    return [await ctx.runtime.stop_service(r, reason="stopped by request", op=op) for r in wanted]


async def _run_job(
    recorder: Recorder, workspace: WorkspaceRecord, job: CommandDef, op: Operation
) -> None:
    assert workspace.cwd is not None
    cwd = os.path.join(workspace.cwd, job.cwd) if job.cwd else workspace.cwd
    values = template_values(workspace)
    env = {
        **sanitized_env(),
        **workspace_env(workspace),
        **{key: render(value, values) for key, value in job.env.items()},
    }
    nested = await recorder.run_command(
        "workspace_provision",
        job.command,
        cwd=cwd,
        env=env,
        timeout=job.job_timeout(),
        metadata={"workspaceCommandId": job.id, "commandKind": "job", "commandName": job.name},
        parent_id=op.id,
    )
    op.metadata["nestedOperationId"] = nested.id
    op.exit_code = nested.exit_code
    if not nested.succeeded:
        excerpt = nested.stderr.excerpt()[-1000:] or nested.stdout.excerpt()[-1000:]
        raise FailedPrecondition(
            f"{job.name} failed (exit code {nested.exit_code}): {excerpt}",
            reason="WORKSPACE_COMMAND_FAILED",
            metadata={"nested_operation_id": nested.id, "exit_code": str(nested.exit_code)},
        )
    op.note(f"Ran {job.name}.")


async def _write_desired_state(
    ctx: ServiceContext, workspace_id: str, selection: Selection, *, failed: bool
) -> None:
    """Merge the desired-state patch into the config (a failed start writes stopped)."""
    if selection.keeps_desired_state or selection.action == "run":
        return
    action: Literal["start", "stop", "restart"]
    if failed or selection.action == "stop":
        action = "stop"
    else:
        action = "restart" if selection.action == "restart" else "start"
    async with ctx.db.unit_of_work() as tx:
        workspace = await load_workspace(tx, workspace_id, for_update=True)
        patch = desired_state_patch(
            workspace.config,
            action=action,
            service_count=len(selection.services),
            index=selection.index,
        )
        await store.update_workspace(
            tx,
            workspace_id,
            {"config": merge_config(workspace.config, patch), "last_used_at": datetime.now(UTC)},
        )
