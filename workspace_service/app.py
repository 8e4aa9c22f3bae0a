"""The gRPC services the workspace-service process serves, wired to their dependencies."""

from __future__ import annotations

import grpc

from common import metrics
from common.config import Settings
from common.database_url import asyncpg_dsn
from common.db import Database
from common.server import ServiceSpec
from common.service_main import Wiring
from paperclip.workspaces.v1 import (
    workspace_leases_pb2,
    workspace_leases_pb2_grpc,
    workspaces_pb2,
    workspaces_pb2_grpc,
)
from workspace_service import issue_reaper, lease_sweep, retention
from workspace_service.api import WorkspaceServicer
from workspace_service.host_routing import HostRouter
from workspace_service.hosts import HostRegistration
from workspace_service.lease_api import WorkspaceLeaseServicer
from workspace_service.runtime_services import RuntimeSupervisor
from workspace_service.service_context import ServiceContext

WORKSPACE_SERVICE = workspaces_pb2.DESCRIPTOR.services_by_name["WorkspaceService"].full_name
LEASE_SERVICE = workspace_leases_pb2.DESCRIPTOR.services_by_name["WorkspaceLeaseService"].full_name


def build_context(db: Database, settings: Settings, host: str | None = None) -> ServiceContext:
    """The service context of one workspace-service process on ``host`` (default: the
    ``PAPERCLIP_HOST`` setting)."""
    name = host or settings.host
    return ServiceContext(
        db=db, settings=settings, runtime=RuntimeSupervisor(db, settings, name), host=name
    )


def service_specs(ctx: ServiceContext, router: HostRouter | None = None) -> list[ServiceSpec]:
    """``WorkspaceService`` (public) and ``WorkspaceLeaseService`` (internal)."""
    servicer = WorkspaceServicer(ctx, router)
    lease_servicer = WorkspaceLeaseServicer(ctx.db)

    def register_public(server: grpc.aio.Server) -> None:
        workspaces_pb2_grpc.add_WorkspaceServiceServicer_to_server(servicer, server)

    def register_leases(server: grpc.aio.Server) -> None:
        workspace_leases_pb2_grpc.add_WorkspaceLeaseServiceServicer_to_server(
            lease_servicer, server
        )

    return [
        ServiceSpec(WORKSPACE_SERVICE, register_public),
        ServiceSpec(LEASE_SERVICE, register_leases),
    ]


def wiring(db: Database, settings: Settings) -> Wiring:
    """The workspace service process: its services; once it listens, the start-up pass
    over this host's recorded runtime services (adopt, clean up, restart desired ones),
    the lease sweep, the reaper of closed issues' services and the retention sweep
    (each one replica at a time), the rotation of this host's runtime-service logs, and
    the registration of this host (``hosts``); on the way out, the
    registration is removed and this process's services are stopped (their desired
    state is kept, so the next start brings them back)."""
    ctx = build_context(db, settings)
    router = HostRouter(db, ctx.host)
    registration = HostRegistration(db, ctx.host)
    assert settings.database_url is not None
    jobs = [
        ctx.runtime.startup(),
        lease_sweep.sweep_forever(db, interval=settings.lease_sweep_seconds),
        issue_reaper.reap_forever(
            ctx, asyncpg_dsn(settings.database_url), interval=settings.workspace_reap_seconds
        ),
        metrics.lease_gauges(db),
        retention.retention_forever(db, settings),
        retention.rotate_logs_forever(settings),
    ]
    return Wiring(
        specs=service_specs(ctx, router),
        jobs=jobs,
        on_stop=[registration.release, router.close, ctx.runtime.shutdown],
        on_listen=[registration.keep],
    )
