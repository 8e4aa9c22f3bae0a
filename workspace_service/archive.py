"""ArchiveExecutionWorkspace.

Refused with FAILED_PRECONDITION ``WORKSPACE_CLOSE_BLOCKED`` (nothing changes) while
close readiness is blocked. Otherwise the workspace is closed first (archived, its
leases released, its services' desired state stopped) in one transaction, so nothing
new starts in it; then its services are stopped and its cleanup runs (cleanup and
teardown commands, worktree removal, branch deletion when merged, directory removal).
Cleanup warnings are joined into ``cleanup_reason``; a cleanup that leaves the
workspace's files behind, or that fails outright, ends ``cleanup_failed``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from common.actor import Actor
from common.audit import record_activity
from common.errors import FailedPrecondition
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from workspace_service import access, cleanup, commands, leases, store
from workspace_service.close_readiness import add_git_state, assess
from workspace_service.model import WorkspaceRecord
from workspace_service.service_context import ServiceContext
from workspace_service.workspace_config import desired_state_patch, merge_config
from workspace_service.workspaces import load_workspace, uuid_argument, workspace_proto

logger = logging.getLogger(__name__)
ENTITY_TYPE = "execution_workspace"


async def archive_workspace(
    ctx: ServiceContext, actor: Actor, workspace_id: str
) -> pb.ArchiveExecutionWorkspaceResponse:
    """Close and clean up the workspace; the closed workspace and every warning."""
    canonical = uuid_argument("workspace_id", workspace_id)
    async with ctx.locks.hold(f"workspace:{canonical}"):
        async with ctx.db.unit_of_work() as tx:
            workspace = await load_workspace(tx, canonical)
            await access.require_manage(
                tx, actor, company_id=workspace.company_id, issue_id=workspace.source_issue_id
            )
            readiness = await assess(tx, workspace)
        await add_git_state(readiness)
        if readiness.blocking_reasons:
            raise FailedPrecondition(
                readiness.blocking_reasons[0],
                reason="WORKSPACE_CLOSE_BLOCKED",
                metadata={
                    "workspace_id": canonical,
                    "blocking_reasons": " | ".join(readiness.blocking_reasons),
                },
            )
        closed = await _close(ctx, actor, canonical)
        cleanup_warnings, cleaned = await _clean_up(ctx, actor, closed)
        async with ctx.db.unit_of_work() as tx:
            final = await store.update_workspace(
                tx,
                canonical,
                {
                    "status": "archived" if cleaned else "cleanup_failed",
                    "cleanup_reason": " | ".join(cleanup_warnings) or None,
                },
            )
            if not cleaned:
                record_activity(
                    tx,
                    actor=actor,
                    company_id=final.company_id,
                    action="execution_workspace.cleanup_failed",
                    entity_type=ENTITY_TYPE,
                    entity_id=final.id,
                    details={"warnings": cleanup_warnings},
                )
            proto = await workspace_proto(tx, final)
    return pb.ArchiveExecutionWorkspaceResponse(
        workspace=proto, warnings=[*readiness.warnings, *cleanup_warnings]
    )


async def _close(ctx: ServiceContext, actor: Actor, workspace_id: str) -> WorkspaceRecord:
    """Mark the workspace archived, release its leases, want its services stopped."""
    async with ctx.db.unit_of_work() as tx:
        workspace = await load_workspace(tx, workspace_id, for_update=True)
        if not workspace.is_open:
            raise FailedPrecondition(
                f"The workspace is already closed ({workspace.status}).",
                reason="WORKSPACE_CLOSE_BLOCKED",
                metadata={"workspace_id": workspace_id},
            )
        patch = desired_state_patch(
            workspace.config,
            action="stop",
            service_count=len(commands.services(workspace.config)),
            index=None,
        )
        config = merge_config(workspace.config, patch) if workspace.config else None
        closed = await store.update_workspace(
            tx,
            workspace_id,
            {
                "status": "archived",
                "closed_at": datetime.now(UTC),
                "cleanup_reason": None,
                "config": config,
            },
        )
        released = await leases.release_workspace_leases(
            tx, workspace_id=workspace_id, reason="execution_workspace_closed", actor=actor
        )
        record_activity(
            tx,
            actor=actor,
            company_id=closed.company_id,
            action="execution_workspace.archived",
            entity_type=ENTITY_TYPE,
            entity_id=closed.id,
            details={"releasedLeaseIds": released},
        )
    return closed


async def _clean_up(
    ctx: ServiceContext, actor: Actor, workspace: WorkspaceRecord
) -> tuple[list[str], bool]:
    """Stop the services, run the cleanup; (warnings, whether the files are gone)."""
    recorder = ctx.recorder(
        actor,
        company_id=workspace.company_id,
        workspace_id=workspace.id,
        issue_id=workspace.source_issue_id,
    )
    try:
        await ctx.runtime.stop_workspace(workspace.id, reason="workspace archived")
        result = await cleanup.cleanup(recorder, workspace)
    except Exception as exc:
        logger.exception("archive cleanup failed", extra={"workspace_id": workspace.id})
        return [f"Failed to archive execution workspace: {exc}"], False
    return list(result.warnings), result.cleaned
