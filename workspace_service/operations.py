"""ListWorkspaceOperations and GetWorkspaceOperation: what ran in a workspace."""

from __future__ import annotations

import json

from common.actor import Actor
from common.authz import require_company_access
from common.db import Database
from common.errors import NotFound
from common.pagination import parse_page
from common.protoconv import struct, text, timestamp
from common.sql import Row
from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from workspace_service import access, operation_store
from workspace_service.workspaces import load_workspace, uuid_argument

_STATUS = {
    "running": messages.OPERATION_STATUS_RUNNING,
    "succeeded": messages.OPERATION_STATUS_SUCCEEDED,
    "failed": messages.OPERATION_STATUS_FAILED,
}


def operation_proto(row: Row, *, with_output: bool) -> messages.WorkspaceOperation:
    """The proto of an operation row (output only when asked and selected)."""
    metadata = row["metadata"]
    out = messages.WorkspaceOperation(
        id=str(row["id"]),
        company_id=str(row["company_id"]),
        workspace_id=text(row["workspace_id"]),
        run_id=text(row["run_id"]),
        issue_id=text(row["issue_id"]),
        actor_type=row["actor_type"],
        actor_id=row["actor_id"],
        phase=row["phase"],
        command=row["command"],
        cwd=text(row["cwd"]),
        status=_STATUS[row["status"]],
        stdout_excerpt=row["stdout_excerpt"],
        stderr_excerpt=row["stderr_excerpt"],
        stdout_bytes=row["stdout_bytes"],
        stderr_bytes=row["stderr_bytes"],
        stdout_sha256=row["stdout_sha256"],
        stderr_sha256=row["stderr_sha256"],
        parent_operation_id=text(row["parent_operation_id"]),
        metadata=struct(json.loads(metadata) if isinstance(metadata, str) else metadata),
        started_at=timestamp(row["started_at"]),
        finished_at=timestamp(row["finished_at"]),
    )
    if row["exit_code"] is not None:
        out.exit_code = row["exit_code"]
    if with_output:
        out.stdout = row["stdout"]
        out.stderr = row["stderr"]
    return out


async def get_operation(
    db: Database, actor: Actor, operation_id: str
) -> messages.WorkspaceOperation:
    """One operation with the kept tail of its output."""
    canonical = uuid_argument("operation_id", operation_id)
    async with db.unit_of_work() as tx:
        row = await operation_store.load_operation(tx, canonical)
    if row is None:
        raise NotFound(
            "workspace operation not found",
            reason="WORKSPACE_OPERATION_NOT_FOUND",
            metadata={"operation_id": canonical},
        )
    require_company_access(actor, str(row["company_id"]), write=False)
    return operation_proto(row, with_output=True)


async def list_operations(
    db: Database, actor: Actor, request: pb.ListWorkspaceOperationsRequest
) -> pb.ListWorkspaceOperationsResponse:
    """A page of a workspace's operations, newest first, without output."""
    workspace_id = uuid_argument("workspace_id", request.workspace_id)
    page = parse_page(request.page_size, request.page_token, workspace_id=workspace_id)
    after_t = page.cursor_time("t") if page.cursor else None
    after_id = page.cursor_uuid("i") if page.cursor else None
    async with db.unit_of_work() as tx:
        workspace = await load_workspace(tx, workspace_id)
        access.require_read(actor, workspace)
        rows = await operation_store.list_operations(
            tx, workspace_id, after_t=after_t, after_id=after_id, limit=page.fetch_limit
        )
    shown, token = page.finish(
        rows, lambda r: {"t": r["started_at"].isoformat(), "i": str(r["id"])}
    )
    return pb.ListWorkspaceOperationsResponse(
        operations=[operation_proto(row, with_output=False) for row in shown],
        next_page_token=token,
    )
