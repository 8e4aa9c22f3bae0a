"""The run service's client of the workspace service: ``ReleaseRunLeases`` after a run
ends (docs/architecture.md, "Run ends").

Calls are signed as the ``run_service`` service actor. The call is an idempotent
compare-and-set (the workspace service checks the run really ended and touches only
its leases), so it is retried with backoff until acknowledged; only a shutdown of the
run service gives up early. Whatever is not released here, the workspace service's
lease sweep releases later. A deployment without a workspace service (no address, or
port 0) makes no call at all.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import grpc.aio

from common.actor import service_actor, sign_actor
from common.channels import backend_channel, replica_addresses, service_methods
from common.config import Settings
from paperclip.runs.v1 import run_messages_pb2
from paperclip.workspaces.v1 import workspace_leases_pb2, workspace_leases_pb2_grpc
from run_service.acknowledged_call import until_acknowledged
from run_service.run_store import RUN_STATUS_TO_PROTO

logger = logging.getLogger(__name__)

SERVICE_NAME = "run_service"
#: ReleaseRunLeases is a compare-and-set: retried on UNAVAILABLE by the channel.
IDEMPOTENT_METHODS = service_methods("paperclip.workspaces.v1.WorkspaceLeaseService")
#: Deadline of one call to the workspace service.
CALL_TIMEOUT_SECONDS = 10.0


def configured(addr: str) -> bool:
    """Whether ``addr`` names a workspace service to call (set, and not port 0)."""
    return bool(addr) and not any(entry.endswith(":0") for entry in replica_addresses(addr))


class WorkspaceClient:
    """Calls ``WorkspaceLeaseService`` at ``settings.workspace_service_addr``. Create and
    use it inside the event loop."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._leases: workspace_leases_pb2_grpc.WorkspaceLeaseServiceAsyncStub | None = None
        self._closing = asyncio.Event()
        self._said_unconfigured = False

    def _stub(self) -> workspace_leases_pb2_grpc.WorkspaceLeaseServiceAsyncStub:
        if self._leases is None:
            self._channel = backend_channel(
                self._settings.workspace_service_addr,
                idempotent_methods=IDEMPOTENT_METHODS,
                setting="PAPERCLIP_WORKSPACE_SERVICE_ADDR",
            )
            self._leases = workspace_leases_pb2_grpc.WorkspaceLeaseServiceStub(self._channel)
        return self._leases

    async def release_run_leases(self, run_id: str, run_status: str) -> list[str] | None:
        """End the environment leases of the (terminal) run; the lease ids ended.

        ``run_status`` is the run's terminal status (the workspace service prefers the
        one it reads). Retried with backoff until acknowledged. Returns None when no
        workspace service is configured, the client is closing (shutdown) or the call
        is refused for good (logged): the lease sweep converges those."""
        if not configured(self._settings.workspace_service_addr):
            if not self._said_unconfigured:
                self._said_unconfigured = True
                logger.info("no workspace service configured: run leases left to its sweep")
            return None
        request = workspace_leases_pb2.ReleaseRunLeasesRequest(
            run_id=run_id,
            run_status=RUN_STATUS_TO_PROTO.get(run_status, run_messages_pb2.RUN_STATUS_UNSPECIFIED),
        )

        async def release() -> list[str]:
            reply = await self._stub().ReleaseRunLeases(
                request,
                metadata=sign_actor(service_actor(SERVICE_NAME), self._settings.internal_key),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            return list(reply.lease_ids)

        return await until_acknowledged(
            release, name="ReleaseRunLeases", run_id=run_id, closing=self._closing
        )

    def closing(self) -> None:
        """Shutdown begins: the retry loop makes one more attempt at most."""
        self._closing.set()

    async def close(self) -> None:
        """Close the channel (after :meth:`closing` and the last calls)."""
        self._closing.set()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._leases = None
