"""Reading execution workspaces: GetExecutionWorkspace, ListExecutionWorkspaces,
ListRuntimeServices, and the lookups the other workspace functions share."""

from __future__ import annotations

from datetime import datetime

from common.actor import Actor
from common.authz import require_company_access
from common.errors import InvalidArgument, NotFound
from common.pagination import parse_page
from common.sql import Tx
from common.validation import Violations, parse_uuid
from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from workspace_service import access, foreign_reads, store
from workspace_service.model import STATUS_FROM_PROTO, WorkspaceRecord
from workspace_service.service_context import ServiceContext


def workspace_not_found(workspace_id: str) -> NotFound:
    return NotFound(
        "Execution workspace not found",
        reason="WORKSPACE_NOT_FOUND",
        metadata={"workspace_id": workspace_id},
    )


def company_not_found(company_id: str) -> NotFound:
    return NotFound(
        "company not found", reason="COMPANY_NOT_FOUND", metadata={"company_id": company_id}
    )


async def load_workspace(tx: Tx, workspace_id: str, *, for_update: bool = False) -> WorkspaceRecord:
    """The workspace, or NOT_FOUND ``WORKSPACE_NOT_FOUND``."""
    workspace = await store.get_workspace(tx, workspace_id, for_update=for_update)
    if workspace is None:
        raise workspace_not_found(workspace_id)
    return workspace


def uuid_argument(field: str, value: str) -> str:
    """A required UUID argument, canonical (INVALID_ARGUMENT naming ``field``)."""
    parsed = parse_uuid(field, value)
    assert parsed is not None
    return parsed


async def workspace_proto(tx: Tx, workspace: WorkspaceRecord) -> messages.ExecutionWorkspace:
    """The workspace with its runtime services."""
    return workspace.to_proto(await store.runtime_services(tx, workspace.id))


async def get_workspace(
    ctx: ServiceContext, actor: Actor, workspace_id: str
) -> messages.ExecutionWorkspace:
    """One workspace, for anyone who may read its company."""
    canonical = uuid_argument("id", workspace_id)
    async with ctx.db.unit_of_work() as tx:
        workspace = await load_workspace(tx, canonical)
        access.require_read(actor, workspace)
        return await workspace_proto(tx, workspace)


async def list_runtime_services(
    ctx: ServiceContext, actor: Actor, workspace_id: str
) -> pb.ListRuntimeServicesResponse:
    """The runtime service records of a workspace, by service index."""
    canonical = uuid_argument("workspace_id", workspace_id)
    async with ctx.db.unit_of_work() as tx:
        workspace = await load_workspace(tx, canonical)
        access.require_read(actor, workspace)
        services = await store.runtime_services(tx, canonical)
    return pb.ListRuntimeServicesResponse(services=[s.to_proto() for s in services])


async def list_workspaces(
    ctx: ServiceContext, actor: Actor, request: pb.ListExecutionWorkspacesRequest
) -> pb.ListExecutionWorkspacesResponse:
    """A page of a company's workspaces, most recently used first (AIP-132)."""
    v = Violations()
    company_id = optional_uuid(v, "company_id", request.company_id, required=True)
    project_id = optional_uuid(v, "project_id", request.project_id, required=False)
    issue_id = optional_uuid(v, "issue_id", request.issue_id, required=False)
    statuses: set[str] = set()
    for index, value in enumerate(request.statuses):
        status = STATUS_FROM_PROTO.get(value)
        if status is None:
            v.add(f"statuses[{index}]", "must be a known, specified WorkspaceStatus")
        else:
            statuses.add(status)
    v.raise_if_any()
    assert company_id is not None
    require_company_access(actor, company_id, write=False)
    wanted = sorted(statuses)
    page = parse_page(
        request.page_size,
        request.page_token,
        company_id=company_id,
        project_id=project_id,
        issue_id=issue_id,
        statuses=wanted,
        reuse_eligible=request.reuse_eligible,
    )
    after = (page.cursor_time("t"), page.cursor_uuid("i")) if page.cursor else None
    async with ctx.db.unit_of_work() as tx:
        if not await foreign_reads.company_exists(tx, company_id):
            raise company_not_found(company_id)
        records = await store.list_workspaces(
            tx,
            company_id=company_id,
            project_id=project_id,
            issue_id=issue_id,
            statuses=wanted,
            reuse_eligible=request.reuse_eligible,
            after=after,
            limit=page.fetch_limit,
        )
        shown, token = page.finish(records, _cursor_of)
        services = await store.runtime_services_of(tx, [record.id for record in shown])
    protos = [record.to_proto(services[record.id]) for record in shown]
    return pb.ListExecutionWorkspacesResponse(workspaces=protos, next_page_token=token)


def _cursor_of(record: WorkspaceRecord) -> dict[str, str]:
    return {"t": _iso(record.last_used_at), "i": record.id}


def _iso(value: datetime) -> str:
    return value.isoformat()


def optional_uuid(v: Violations, field: str, value: str, *, required: bool = False) -> str | None:
    """A UUID field, its violation collected in ``v`` (None when empty or bad)."""
    try:
        return parse_uuid(field, value, required=required)
    except InvalidArgument as exc:
        for violation in exc.violations:
            v.add(violation.field, violation.description)
        return None
