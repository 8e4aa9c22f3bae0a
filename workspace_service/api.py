"""The public ``paperclip.workspaces.v1.WorkspaceService`` servicer: an entrypoint only.

Each RPC takes the verified actor of the call, hands the request to one service
function and returns its proto; errors are mapped to gRPC status by the interceptor.
"""

from __future__ import annotations

from common.interceptors import Context
from common.request_context import current_actor
from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from paperclip.workspaces.v1 import workspaces_pb2_grpc
from workspace_service import (
    archive,
    close_readiness,
    leases,
    operations,
    runtime_control,
    workspace_create,
    workspace_update,
    workspaces,
)
from workspace_service.host_routing import HostRouter
from workspace_service.service_context import ServiceContext


class WorkspaceServicer(workspaces_pb2_grpc.WorkspaceServiceServicer):
    """Execution workspaces, their runtime services, operations and leases.

    The calls that touch a workspace's directory or processes are served on its host
    (``host_routing``): from another host's replica they are forwarded there."""

    def __init__(self, ctx: ServiceContext, router: HostRouter | None = None) -> None:
        self._ctx = ctx
        self._router = router or HostRouter(ctx.db, ctx.host)

    async def CreateExecutionWorkspace(
        self, request: pb.CreateExecutionWorkspaceRequest, context: Context
    ) -> messages.ExecutionWorkspace:
        """Make (or reuse) a workspace and provision it, on the host of the caller's run."""
        remote = await self._router.for_new_workspace(current_actor(), context)
        if remote is not None:
            return await remote.call(
                "CreateExecutionWorkspace", request, context, messages.ExecutionWorkspace
            )
        return await workspace_create.create_workspace(self._ctx, current_actor(), request)

    async def GetExecutionWorkspace(
        self, request: pb.GetExecutionWorkspaceRequest, context: Context
    ) -> messages.ExecutionWorkspace:
        """One workspace with its runtime services."""
        return await workspaces.get_workspace(self._ctx, current_actor(), request.id)

    async def ListExecutionWorkspaces(
        self, request: pb.ListExecutionWorkspacesRequest, context: Context
    ) -> pb.ListExecutionWorkspacesResponse:
        """A page of a company's workspaces, most recently used first."""
        return await workspaces.list_workspaces(self._ctx, current_actor(), request)

    async def UpdateExecutionWorkspace(
        self, request: pb.UpdateExecutionWorkspaceRequest, context: Context
    ) -> messages.ExecutionWorkspace:
        """Change the fields named by the update mask."""
        return await workspace_update.update_workspace(self._ctx, current_actor(), request)

    async def GetCloseReadiness(
        self, request: pb.GetCloseReadinessRequest, context: Context
    ) -> pb.CloseReadiness:
        """Whether the workspace may be archived now, and what archiving would do."""
        remote = await self._router.for_workspace(request.workspace_id, context)
        if remote is not None:
            return await remote.call("GetCloseReadiness", request, context, pb.CloseReadiness)
        return await close_readiness.get_close_readiness(
            self._ctx, current_actor(), request.workspace_id
        )

    async def ArchiveExecutionWorkspace(
        self, request: pb.ArchiveExecutionWorkspaceRequest, context: Context
    ) -> pb.ArchiveExecutionWorkspaceResponse:
        """Close the workspace and clean up after it."""
        remote = await self._router.for_workspace(request.workspace_id, context)
        if remote is not None:
            return await remote.call(
                "ArchiveExecutionWorkspace", request, context, pb.ArchiveExecutionWorkspaceResponse
            )
        return await archive.archive_workspace(self._ctx, current_actor(), request.workspace_id)

    async def ControlRuntimeServices(
        self, request: pb.ControlRuntimeServicesRequest, context: Context
    ) -> pb.ControlRuntimeServicesResponse:
        """Start, stop or restart services, or run a job."""
        remote = await self._router.for_workspace(request.workspace_id, context)
        if remote is not None:
            return await remote.call(
                "ControlRuntimeServices", request, context, pb.ControlRuntimeServicesResponse
            )
        return await runtime_control.control_runtime_services(self._ctx, current_actor(), request)

    async def ListRuntimeServices(
        self, request: pb.ListRuntimeServicesRequest, context: Context
    ) -> pb.ListRuntimeServicesResponse:
        """The workspace's runtime service records."""
        return await workspaces.list_runtime_services(
            self._ctx, current_actor(), request.workspace_id
        )

    async def ListWorkspaceOperations(
        self, request: pb.ListWorkspaceOperationsRequest, context: Context
    ) -> pb.ListWorkspaceOperationsResponse:
        """A page of the workspace's operations, newest first, without output."""
        return await operations.list_operations(self._ctx.db, current_actor(), request)

    async def GetWorkspaceOperation(
        self, request: pb.GetWorkspaceOperationRequest, context: Context
    ) -> messages.WorkspaceOperation:
        """One operation with its output."""
        return await operations.get_operation(self._ctx.db, current_actor(), request.operation_id)

    async def AcquireEnvironmentLease(
        self, request: pb.AcquireEnvironmentLeaseRequest, context: Context
    ) -> messages.EnvironmentLease:
        """Take (or get back) the active lease of an environment for a workspace."""
        return await leases.acquire_lease(self._ctx.db, current_actor(), request)

    async def RenewEnvironmentLease(
        self, request: pb.RenewEnvironmentLeaseRequest, context: Context
    ) -> messages.EnvironmentLease:
        """Push an active lease's expiry out by its TTL."""
        return await leases.renew_lease(self._ctx.db, current_actor(), request)

    async def ReleaseEnvironmentLease(
        self, request: pb.ReleaseEnvironmentLeaseRequest, context: Context
    ) -> messages.EnvironmentLease:
        """End a lease (idempotent)."""
        return await leases.release_lease(self._ctx.db, current_actor(), request)
