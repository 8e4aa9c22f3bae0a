"""Which public methods the gateway routes, and to which backend: read from the
service descriptors, so a new RPC in a public service needs no gateway code.

Internal services (IssueLockService, WorkspaceLeaseService) are simply not listed:
the gateway answers UNIMPLEMENTED for them, as for any unknown method.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import descriptor_pool
from paperclip_client.client import LONG_RUNNING_METHODS

# Imported for their side effect: registering the public services' descriptors.
from paperclip.issues.v1 import issues_pb2  # noqa: F401
from paperclip.runs.v1 import runs_pb2  # noqa: F401
from paperclip.workspaces.v1 import workspaces_pb2  # noqa: F401

#: Public service -> the backend that serves it (its address setting names it).
PUBLIC_SERVICES: dict[str, str] = {
    "paperclip.issues.v1.IssueService": "issue_service",
    "paperclip.runs.v1.RunService": "run_service",
    "paperclip.workspaces.v1.WorkspaceService": "workspace_service",
}


#: Unary methods that may run commands for a long time (a job, a provision command, a
#: cleanup): their default deadline is the long one, not the unary one.


@dataclass(frozen=True)
class Route:
    """One routed method."""

    path: str
    service: str
    backend: str
    server_streaming: bool

    @property
    def long_running(self) -> bool:
        """Streams and command-running methods get the long default deadline."""
        return self.server_streaming or self.path in LONG_RUNNING_METHODS


def build_routes(services: dict[str, str] = PUBLIC_SERVICES) -> dict[str, Route]:
    """Every method of every public service, by its ``/package.Service/Method`` path."""
    pool = descriptor_pool.Default()
    routes: dict[str, Route] = {}
    for name, backend in services.items():
        service = pool.FindServiceByName(name)
        for method in service.methods:
            if method.client_streaming:
                raise ValueError(f"client-streaming {method.full_name} cannot be routed")
            path = f"/{name}/{method.name}"
            routes[path] = Route(path, name, backend, method.server_streaming)
    return routes
