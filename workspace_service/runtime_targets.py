"""What a ControlRuntimeServices request targets: checked in
order, each refusal with its own code and reason, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from workspace_service import commands
from workspace_service.commands import CommandDef
from workspace_service.model import RuntimeServiceRecord, WorkspaceRecord

Action = Literal["start", "stop", "restart", "run"]


@dataclass(frozen=True)
class Selection:
    """The services (or the one job) an action applies to."""

    action: Action
    #: The command the request named, if any.
    command: CommandDef | None
    #: The runtime record the request named, if any.
    service_record: RuntimeServiceRecord | None
    #: The one service index targeted; None: every service.
    index: int | None
    services: list[CommandDef]

    @property
    def targets(self) -> list[CommandDef]:
        """The service commands the action applies to."""
        if self.index is None:
            return self.services
        return [s for s in self.services if s.service_index == self.index]

    @property
    def keeps_desired_state(self) -> bool:
        """A target named only by its runtime record leaves the desired state alone."""
        return self.service_record is not None and self.command is None


def select(
    workspace: WorkspaceRecord,
    *,
    action: Action,
    command_id: str,
    runtime_service_id: str | None,
    service_index: int | None,
    records: list[RuntimeServiceRecord],
) -> Selection:
    """The selection of a control request on ``workspace``, or the first refusal."""
    if not workspace.cwd:
        raise FailedPrecondition(
            "Execution workspace needs a local path before Paperclip can run workspace commands",
            reason="WORKSPACE_PATH_MISSING",
            metadata={"workspace_id": workspace.id},
        )
    config = workspace.config
    services = commands.services(config)
    command: CommandDef | None = None
    if command_id:
        command = commands.find(config, command_id)
        if command is None:
            raise NotFound(
                "Workspace command not found for this execution workspace",
                reason="WORKSPACE_COMMAND_NOT_FOUND",
                metadata={"workspace_command_id": command_id},
            )
    record: RuntimeServiceRecord | None = None
    if runtime_service_id:
        record = next((r for r in records if r.id == runtime_service_id), None)
        if record is None:
            raise NotFound(
                "Runtime service not found for this execution workspace",
                reason="RUNTIME_SERVICE_NOT_FOUND",
                metadata={"runtime_service_id": runtime_service_id},
            )
    index = _index(command, record, service_index, services)
    _check_kind(action, command)
    if action in ("start", "restart") and not services:
        raise FailedPrecondition(
            "Execution workspace has no workspace command configuration",
            reason="WORKSPACE_RUNTIME_NOT_CONFIGURED",
            metadata={"workspace_id": workspace.id},
        )
    return Selection(action, command, record, index, services)


def _index(
    command: CommandDef | None,
    record: RuntimeServiceRecord | None,
    service_index: int | None,
    services: list[CommandDef],
) -> int | None:
    if command is not None and command.kind == "service":
        index = command.service_index
    elif record is not None:
        index = record.service_index
    else:
        index = service_index
    if index is not None and not 0 <= index < len(services):
        raise FailedPrecondition(
            "Selected runtime service is not defined in this execution workspace runtime config",
            reason="RUNTIME_SERVICE_NOT_DEFINED",
            metadata={"service_index": str(index), "services": str(len(services))},
        )
    return index


def _check_kind(action: Action, command: CommandDef | None) -> None:
    if command is not None and command.kind == "job" and action != "run":
        raise FailedPrecondition(
            f'Workspace job "{command.name}" can only be run',
            reason="WORKSPACE_COMMAND_ACTION_MISMATCH",
            metadata={"workspace_command_id": command.id, "action": action},
        )
    if command is not None and command.kind == "service" and action == "run":
        raise FailedPrecondition(
            f'Workspace service "{command.name}" should be started or restarted, not run',
            reason="WORKSPACE_COMMAND_ACTION_MISMATCH",
            metadata={"workspace_command_id": command.id, "action": action},
        )
    if action == "run" and command is None:
        raise InvalidArgument(
            "Select a workspace job to run",
            violations=[FieldViolation("workspace_command_id", "names the job to run")],
        )
