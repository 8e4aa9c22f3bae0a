"""Workspace records as read from the database, and their proto forms."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.protoconv import struct, text, text_or_none, timestamp
from common.sql import Row
from paperclip.workspaces.v1 import workspace_messages_pb2 as pb
from workspace_service.workspace_config import Config, config_to_proto, read_config

MODE_TO_PROTO = {
    "shared_workspace": pb.WORKSPACE_MODE_SHARED_WORKSPACE,
    "isolated_workspace": pb.WORKSPACE_MODE_ISOLATED_WORKSPACE,
    "operator_branch": pb.WORKSPACE_MODE_OPERATOR_BRANCH,
    "adapter_managed": pb.WORKSPACE_MODE_ADAPTER_MANAGED,
    "cloud_sandbox": pb.WORKSPACE_MODE_CLOUD_SANDBOX,
}
MODE_FROM_PROTO = {v: k for k, v in MODE_TO_PROTO.items()}
STRATEGY_TO_PROTO = {
    "project_primary": pb.WORKSPACE_STRATEGY_PROJECT_PRIMARY,
    "git_worktree": pb.WORKSPACE_STRATEGY_GIT_WORKTREE,
}
STRATEGY_FROM_PROTO = {v: k for k, v in STRATEGY_TO_PROTO.items()}
STATUS_TO_PROTO = {
    "active": pb.WORKSPACE_STATUS_ACTIVE,
    "idle": pb.WORKSPACE_STATUS_IDLE,
    "in_review": pb.WORKSPACE_STATUS_IN_REVIEW,
    "archived": pb.WORKSPACE_STATUS_ARCHIVED,
    "cleanup_failed": pb.WORKSPACE_STATUS_CLEANUP_FAILED,
}
STATUS_FROM_PROTO = {v: k for k, v in STATUS_TO_PROTO.items()}
SERVICE_STATUS_TO_PROTO = {
    "starting": pb.RUNTIME_SERVICE_STATUS_STARTING,
    "running": pb.RUNTIME_SERVICE_STATUS_RUNNING,
    "stopped": pb.RUNTIME_SERVICE_STATUS_STOPPED,
    "failed": pb.RUNTIME_SERVICE_STATUS_FAILED,
}
HEALTH_TO_PROTO = {
    "unknown": pb.HEALTH_STATUS_UNKNOWN,
    "healthy": pb.HEALTH_STATUS_HEALTHY,
    "unhealthy": pb.HEALTH_STATUS_UNHEALTHY,
}
#: Workspaces that are still open (not closed by an archive).
OPEN_STATUSES = ("active", "idle", "in_review")
CLOSED_STATUSES = ("archived", "cleanup_failed")
#: Runtime service statuses that hold a process (and a port).
LIVE_SERVICE_STATUSES = ("starting", "running")


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class WorkspaceRecord:
    """One ``workspaces.execution_workspaces`` row."""

    id: str
    company_id: str
    project_id: str | None
    source_issue_id: str | None
    name: str
    mode: str
    strategy_type: str
    status: str
    cwd: str | None
    repo_url: str | None
    repo_path: str | None
    base_ref: str | None
    branch_name: str | None
    provider_type: str
    provider_ref: str | None
    created_by_runtime: bool
    config: Config | None
    metadata: dict[str, Any]
    cleanup_reason: str | None
    last_used_at: datetime
    opened_at: datetime
    closed_at: datetime | None
    cleanup_eligible_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> WorkspaceRecord:
        return cls(
            id=str(row["id"]),
            company_id=str(row["company_id"]),
            project_id=text_or_none(row["project_id"]),
            source_issue_id=text_or_none(row["source_issue_id"]),
            name=row["name"],
            mode=row["mode"],
            strategy_type=row["strategy_type"],
            status=row["status"],
            cwd=row["cwd"],
            repo_url=row["repo_url"],
            repo_path=row["repo_path"],
            base_ref=row["base_ref"],
            branch_name=row["branch_name"],
            provider_type=row["provider_type"],
            provider_ref=row["provider_ref"],
            created_by_runtime=row["created_by_runtime"],
            config=read_config(_json(row["config"])),
            metadata=dict(_json(row["metadata"]) or {}),
            cleanup_reason=row["cleanup_reason"],
            last_used_at=row["last_used_at"],
            opened_at=row["opened_at"],
            closed_at=row["closed_at"],
            cleanup_eligible_at=row["cleanup_eligible_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def is_shared(self) -> bool:
        return self.mode == "shared_workspace"

    @property
    def is_git_worktree(self) -> bool:
        return self.provider_type == "git_worktree"

    def to_proto(self, services: list[RuntimeServiceRecord] | None = None) -> pb.ExecutionWorkspace:
        return pb.ExecutionWorkspace(
            id=self.id,
            company_id=self.company_id,
            project_id=text(self.project_id),
            source_issue_id=text(self.source_issue_id),
            name=self.name,
            mode=MODE_TO_PROTO[self.mode],
            strategy_type=STRATEGY_TO_PROTO[self.strategy_type],
            status=STATUS_TO_PROTO[self.status],
            cwd=text(self.cwd),
            repo_url=text(self.repo_url),
            repo_path=text(self.repo_path),
            base_ref=text(self.base_ref),
            branch_name=text(self.branch_name),
            provider_type=self.provider_type,
            provider_ref=text(self.provider_ref),
            created_by_runtime=self.created_by_runtime,
            config=config_to_proto(self.config),
            runtime_services=[s.to_proto() for s in services or []],
            metadata=struct(self.metadata),
            cleanup_reason=text(self.cleanup_reason),
            last_used_at=timestamp(self.last_used_at),
            opened_at=timestamp(self.opened_at),
            closed_at=timestamp(self.closed_at),
            cleanup_eligible_at=timestamp(self.cleanup_eligible_at),
            created_at=timestamp(self.created_at),
            updated_at=timestamp(self.updated_at),
        )


@dataclass(frozen=True)
class RuntimeServiceRecord:
    """One ``workspaces.runtime_services`` row: the latest process of one service."""

    id: str
    company_id: str
    workspace_id: str
    workspace_command_id: str
    service_name: str
    service_index: int
    status: str
    health_status: str
    command: str
    cwd: str
    port: int | None
    url: str | None
    host: str
    pid: int | None
    pgid: int | None
    create_time: float | None
    log_path: str | None
    started_by_run_id: str | None
    last_error: str | None
    started_at: datetime | None
    stopped_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> RuntimeServiceRecord:
        return cls(
            id=str(row["id"]),
            company_id=str(row["company_id"]),
            workspace_id=str(row["workspace_id"]),
            workspace_command_id=row["workspace_command_id"],
            service_name=row["service_name"],
            service_index=row["service_index"],
            status=row["status"],
            health_status=row["health_status"],
            command=row["command"],
            cwd=row["cwd"],
            port=row["port"],
            url=row["url"],
            host=row["host"],
            pid=row["pid"],
            pgid=row["pgid"],
            create_time=row["create_time"],
            log_path=row["log_path"],
            started_by_run_id=text_or_none(row["started_by_run_id"]),
            last_error=row["last_error"],
            started_at=row["started_at"],
            stopped_at=row["stopped_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    @property
    def is_live(self) -> bool:
        return self.status in LIVE_SERVICE_STATUSES

    def to_proto(self) -> pb.RuntimeService:
        return pb.RuntimeService(
            id=self.id,
            workspace_id=self.workspace_id,
            company_id=self.company_id,
            workspace_command_id=self.workspace_command_id,
            service_name=self.service_name,
            service_index=self.service_index,
            status=SERVICE_STATUS_TO_PROTO[self.status],
            health_status=HEALTH_TO_PROTO[self.health_status],
            command=self.command,
            cwd=self.cwd,
            port=self.port or 0,
            url=text(self.url),
            pid=self.pid or 0,
            host=self.host,
            started_by_run_id=text(self.started_by_run_id),
            last_error=text(self.last_error),
            started_at=timestamp(self.started_at),
            stopped_at=timestamp(self.stopped_at),
            created_at=timestamp(self.created_at),
            updated_at=timestamp(self.updated_at),
        )
