"""Bad input on every WorkspaceService RPC (the lease RPCs in test_leases.py):
INVALID_ARGUMENT naming the field, never INTERNAL, and nothing written."""

from __future__ import annotations

import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import field_mask_pb2

from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from tests.harness import Suite, expect_error
from tests.workspace_service.support import WorkspaceWorld, workspace_world

Call = Callable[[WorkspaceWorld, str], Awaitable[Any]]


def _create(**fields: Any) -> Call:
    def call(world: WorkspaceWorld, _ws: str) -> Awaitable[Any]:
        request = pb.CreateExecutionWorkspaceRequest(
            company_id=world.company_id, cwd=tempfile.mkdtemp()
        )
        for key, value in fields.items():
            if key == "config":
                request.config.CopyFrom(value)
            else:
                setattr(request, key, value)
        return world.board.workspaces.CreateExecutionWorkspace(request)

    return call


def _service(**fields: Any) -> messages.WorkspaceConfig:
    command = messages.WorkspaceCommand(name="web", command="serve", **fields)
    return messages.WorkspaceConfig(runtime=messages.WorkspaceRuntime(services=[command]))


def _update(paths: list[str], **fields: Any) -> Call:
    def call(world: WorkspaceWorld, ws: str) -> Awaitable[Any]:
        workspace = messages.ExecutionWorkspace(id=ws)
        for key, value in fields.items():
            if key == "config":
                workspace.config.CopyFrom(value)
            else:
                setattr(workspace, key, value)
        return world.board.workspaces.UpdateExecutionWorkspace(
            pb.UpdateExecutionWorkspaceRequest(
                workspace=workspace, update_mask=field_mask_pb2.FieldMask(paths=paths)
            )
        )

    return call


CASES: list[tuple[str, Call, str]] = [
    ("create: company id", _create(company_id="nope"), "company_id"),
    ("create: mode", _create(mode=99), "mode"),
    ("create: strategy", _create(strategy_type=42), "strategy_type"),
    ("create: relative cwd", _create(cwd="relative/path"), "cwd"),
    ("create: worktree without repo", _create(strategy_type=2, branch_name="b"), "repo_path"),
    ("create: worktree without branch", _create(strategy_type=2, repo_path="/tmp"), "branch_name"),
    ("create: bad branch", _create(branch_name="a..b"), "branch_name"),
    ("create: bad issue id", _create(source_issue_id="x"), "source_issue_id"),
    ("create: reuse without issue", _create(reuse_existing=True), "reuse_existing"),
    (
        "create: empty service command",
        _create(
            config=messages.WorkspaceConfig(
                runtime=messages.WorkspaceRuntime(services=[messages.WorkspaceCommand(name="web")])
            )
        ),
        "config.runtime.services[0].command",
    ),
    (
        "create: reserved env",
        _create(config=_service(env={"PAPERCLIP_X": "1"})),
        "config.runtime.services[0].env",
    ),
    ("create: port range", _create(config=_service(port=70000)), "config.runtime.services[0].port"),
    (
        "create: port twice",
        _create(config=_service(port=3000, auto_port=True)),
        "config.runtime.services[0].port",
    ),
    (
        "create: url scheme",
        _create(config=_service(url="ftp://x")),
        "config.runtime.services[0].url",
    ),
    (
        "create: escaping cwd",
        _create(config=_service(cwd="../up")),
        "config.runtime.services[0].cwd",
    ),
    (
        "create: interval",
        _create(config=_service(readiness=messages.Readiness(interval_ms=5))),
        "config.runtime.services[0].readiness.interval_ms",
    ),
    (
        "create: environment id",
        _create(config=messages.WorkspaceConfig(environment_id="env")),
        "config.environment_id",
    ),
    (
        "get: id",
        lambda w, _ws: w.board.workspaces.GetExecutionWorkspace(
            pb.GetExecutionWorkspaceRequest(id="1")
        ),
        "id",
    ),
    (
        "list: company",
        lambda w, _ws: w.board.workspaces.ListExecutionWorkspaces(
            pb.ListExecutionWorkspacesRequest(company_id="x")
        ),
        "company_id",
    ),
    (
        "list: page size",
        lambda w, _ws: w.board.workspaces.ListExecutionWorkspaces(
            pb.ListExecutionWorkspacesRequest(company_id=w.company_id, page_size=-1)
        ),
        "page_size",
    ),
    (
        "list: status",
        lambda w, _ws: w.board.workspaces.ListExecutionWorkspaces(
            pb.ListExecutionWorkspacesRequest(
                company_id=w.company_id, statuses=[messages.WorkspaceStatus.ValueType(77)]
            )
        ),
        "statuses[0]",
    ),
    (
        "list: token",
        lambda w, _ws: w.board.workspaces.ListExecutionWorkspaces(
            pb.ListExecutionWorkspacesRequest(company_id=w.company_id, page_token="%%%")
        ),
        "page_token",
    ),
    ("update: no mask", _update([], name="x"), "update_mask"),
    ("update: unknown path", _update(["created_at"]), "update_mask"),
    (
        "update: archive by status",
        _update(["status"], status=messages.WORKSPACE_STATUS_ARCHIVED),
        "workspace.status",
    ),
    ("update: empty name", _update(["name"], name="  "), "workspace.name"),
    ("update: relative cwd", _update(["cwd"], cwd="x/y"), "workspace.cwd"),
    (
        "update: bad config",
        _update(["config.runtime"], config=_service(port=-1)),
        "workspace.config.runtime.services[0].port",
    ),
    (
        "readiness: id",
        lambda w, _ws: w.board.workspaces.GetCloseReadiness(
            pb.GetCloseReadinessRequest(workspace_id="")
        ),
        "workspace_id",
    ),
    (
        "archive: id",
        lambda w, _ws: w.board.workspaces.ArchiveExecutionWorkspace(
            pb.ArchiveExecutionWorkspaceRequest(workspace_id="z")
        ),
        "workspace_id",
    ),
    (
        "control: action",
        lambda w, ws: w.board.workspaces.ControlRuntimeServices(
            pb.ControlRuntimeServicesRequest(workspace_id=ws, action=pb.RuntimeAction.ValueType(9))
        ),
        "action",
    ),
    (
        "control: service id",
        lambda w, ws: w.board.workspaces.ControlRuntimeServices(
            pb.ControlRuntimeServicesRequest(
                workspace_id=ws, action=pb.RUNTIME_ACTION_STOP, runtime_service_id="r"
            )
        ),
        "runtime_service_id",
    ),
    (
        "control: index",
        lambda w, ws: w.board.workspaces.ControlRuntimeServices(
            pb.ControlRuntimeServicesRequest(
                workspace_id=ws, action=pb.RUNTIME_ACTION_START, service_index=-1
            )
        ),
        "service_index",
    ),
    (
        "services: id",
        lambda w, _ws: w.board.workspaces.ListRuntimeServices(
            pb.ListRuntimeServicesRequest(workspace_id="q")
        ),
        "workspace_id",
    ),
    (
        "operations: page size",
        lambda w, ws: w.board.workspaces.ListWorkspaceOperations(
            pb.ListWorkspaceOperationsRequest(workspace_id=ws, page_size=-5)
        ),
        "page_size",
    ),
    (
        "operations: id",
        lambda w, _ws: w.board.workspaces.ListWorkspaceOperations(
            pb.ListWorkspaceOperationsRequest(workspace_id="w")
        ),
        "workspace_id",
    ),
    (
        "operation: id",
        lambda w, _ws: w.board.workspaces.GetWorkspaceOperation(
            pb.GetWorkspaceOperationRequest(operation_id="o")
        ),
        "operation_id",
    ),
]


async def test_every_rpc_refuses_bad_input_and_writes_nothing(suite: Suite) -> None:
    world = await workspace_world(suite)
    created = await world.board.workspaces.CreateExecutionWorkspace(
        pb.CreateExecutionWorkspaceRequest(company_id=world.company_id, cwd=tempfile.mkdtemp())
    )
    before = await world.counts()
    for label, call, field in CASES:
        error = await expect_error(call(world, created.id))
        assert (error.code.name, error.reason) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT"), label
        assert field in [v.field for v in error.violations], (label, error.violations)
    assert await world.counts() == before
    unchanged = await world.board.workspaces.GetExecutionWorkspace(
        pb.GetExecutionWorkspaceRequest(id=created.id)
    )
    assert unchanged == created
