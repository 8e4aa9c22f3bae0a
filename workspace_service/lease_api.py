"""The internal ``paperclip.workspaces.v1.WorkspaceLeaseService`` servicer."""

from __future__ import annotations

from common.db import Database
from common.interceptors import Context
from common.request_context import current_actor
from paperclip.workspaces.v1 import workspace_leases_pb2 as pb
from paperclip.workspaces.v1 import workspace_leases_pb2_grpc
from workspace_service import leases


class WorkspaceLeaseServicer(workspace_leases_pb2_grpc.WorkspaceLeaseServiceServicer):
    """Lease calls of the other services."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def ReleaseRunLeases(
        self, request: pb.ReleaseRunLeasesRequest, context: Context
    ) -> pb.ReleaseRunLeasesResponse:
        """End the active leases of a run that ended."""
        return await leases.release_run_leases(self._db, current_actor(), request)
