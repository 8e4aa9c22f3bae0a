"""Wiring of the issue service process: its gRPC services."""

from __future__ import annotations

from common.config import Settings
from common.db import Database
from common.server import ServiceSpec
from common.service_main import Wiring
from issue_service import retention
from issue_service.api import IssueLockServicer, IssueServicer
from issue_service.sweeper import sweep_forever
from paperclip.issues.v1 import issue_locks_pb2_grpc, issues_pb2_grpc

ISSUE_SERVICE = "paperclip.issues.v1.IssueService"
ISSUE_LOCK_SERVICE = "paperclip.issues.v1.IssueLockService"


def service_specs(db: Database, settings: Settings) -> list[ServiceSpec]:
    """The services the issue service process serves."""
    del settings
    return [
        ServiceSpec(
            ISSUE_SERVICE,
            lambda server: issues_pb2_grpc.add_IssueServiceServicer_to_server(
                IssueServicer(db), server
            ),
        ),
        ServiceSpec(
            ISSUE_LOCK_SERVICE,
            lambda server: issue_locks_pb2_grpc.add_IssueLockServiceServicer_to_server(
                IssueLockServicer(db), server
            ),
        ),
    ]


def wiring(db: Database, settings: Settings) -> Wiring:
    """The issue service process: its services, the stale-lock sweep and the
    retention sweep of the outbox and the audit log (each one replica at a time)."""
    return Wiring(
        specs=service_specs(db, settings),
        jobs=[
            sweep_forever(db, interval=settings.lock_sweep_seconds),
            retention.retention_forever(db, settings),
        ],
    )
