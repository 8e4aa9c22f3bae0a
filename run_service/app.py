"""The gRPC services the run-service process serves, wired to their dependencies."""

from __future__ import annotations

import grpc

from common.config import Settings
from common.db import Database
from common.embedded_pg import asyncpg_dsn
from common.server import ServiceSpec
from common.service_main import Wiring
from paperclip.runs.v1 import runs_pb2, runs_pb2_grpc
from run_service.api import RunServicer
from run_service.outbox import consume_forever
from run_service.runner import Runner

RUN_SERVICE = runs_pb2.DESCRIPTOR.services_by_name["RunService"].full_name


def service_specs(db: Database, runner: Runner) -> list[ServiceSpec]:
    """``paperclip.runs.v1.RunService`` on ``db``, running agents with ``runner``."""
    servicer = RunServicer(db, runner)

    def register(server: grpc.aio.Server) -> None:
        runs_pb2_grpc.add_RunServiceServicer_to_server(servicer, server)

    return [ServiceSpec(RUN_SERVICE, register)]


def wiring(db: Database, settings: Settings) -> Wiring:
    """The run service process: its services; its runner (dispatch and supervision),
    started once the server listens and stopped before the pool closes; and the
    consumer that turns the issue service's outbox events into wakes."""
    runner = Runner(db, settings)
    assert settings.database_url is not None
    consumer = consume_forever(
        db, asyncpg_dsn(settings.database_url), poll_seconds=settings.dispatch_poll_seconds
    )
    return Wiring(
        specs=service_specs(db, runner), jobs=[runner.run(), consumer], on_stop=[runner.stop]
    )
