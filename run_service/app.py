"""The gRPC services the run-service process serves, wired to their dependencies."""

from __future__ import annotations

import grpc

from common import metrics
from common.config import Settings
from common.database_url import asyncpg_dsn
from common.db import Database
from common.server import ServiceSpec
from common.service_main import Wiring
from paperclip.runs.v1 import runs_pb2, runs_pb2_grpc
from run_service import queue_age, reconcile, retention, timers, wake_breaker
from run_service.api import RunServicer
from run_service.outbox import consume_forever
from run_service.run_interrupts import interrupt_once
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
    consumer that turns the issue service's outbox events into wakes (and, after each of
    its passes, the run-interrupt pass); the stranded-issue reconciliation every minute,
    the timer-wake tick every few seconds, the expiry of runs queued too long, the
    retention sweep (each one replica at a time) and the wake breaker's notices."""
    wake_breaker.configure(wake_breaker.BreakerPolicy.from_settings(settings))
    runner = Runner(db, settings)
    assert settings.database_url is not None
    consumer = consume_forever(
        db,
        asyncpg_dsn(settings.database_url),
        poll_seconds=settings.dispatch_poll_seconds,
        after_pass=lambda: interrupt_once(db, runner),
    )
    jobs = [
        runner.run(),
        consumer,
        reconcile.reconcile_forever(db, runner, interval=reconcile.INTERVAL_SECONDS),
        timers.tick_forever(db, interval=timers.TICK_SECONDS),
        wake_breaker.announce_forever(db, runner.issues),
        metrics.run_gauges(db),
        queue_age.expire_forever(db, runner, settings.max_queued_seconds),
        retention.retention_forever(db, settings),
    ]
    return Wiring(specs=service_specs(db, runner), jobs=jobs, on_stop=[runner.stop])
