"""The gRPC services the run-service process serves, wired to their dependencies."""

from __future__ import annotations

import grpc

from common.config import Settings
from common.db import Database
from common.server import ServiceSpec
from paperclip.runs.v1 import runs_pb2, runs_pb2_grpc
from run_service.api import RunServicer

RUN_SERVICE = runs_pb2.DESCRIPTOR.services_by_name["RunService"].full_name


def service_specs(db: Database, settings: Settings) -> list[ServiceSpec]:
    """``paperclip.runs.v1.RunService`` on ``db``; ``settings`` is for what runs need later."""
    servicer = RunServicer(db)

    def register(server: grpc.aio.Server) -> None:
        runs_pb2_grpc.add_RunServiceServicer_to_server(servicer, server)

    return [ServiceSpec(RUN_SERVICE, register)]
