"""Execution workspaces through the real WorkspaceService: create (local directories),
get, list, update with update masks, reuse and refresh."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Awaitable
from typing import Any

from google.protobuf import field_mask_pb2

from common.actor import Role
from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from tests.harness import Suite, board, expect_error, fetch_value
from tests.workspace_service.support import (
    WorkspaceWorld,
    mark_closed,
    path_exists,
    workspace_world,
)

ISOLATED = messages.WORKSPACE_MODE_ISOLATED_WORKSPACE


def _dir() -> str:
    return os.path.join(tempfile.mkdtemp(prefix="paperclip-ws-"), "work")


def _runtime(*commands: str) -> messages.WorkspaceRuntime:
    return messages.WorkspaceRuntime(
        services=[
            messages.WorkspaceCommand(name=f"svc{i}", command=c) for i, c in enumerate(commands)
        ]
    )


async def _create(world: WorkspaceWorld, **fields: object) -> messages.ExecutionWorkspace:
    request = pb.CreateExecutionWorkspaceRequest(company_id=world.company_id, **fields)  # type: ignore[arg-type]
    if not request.cwd:
        request.cwd = _dir()
    return await world.board.workspaces.CreateExecutionWorkspace(request)


async def test_create_makes_the_directory_and_records_the_workspace(suite: Suite) -> None:
    world = await workspace_world(suite)
    cwd = _dir()
    created = await _create(
        world,
        cwd=cwd,
        name="  scratch  ",
        config=messages.WorkspaceConfig(provision_command="  touch provisioned  "),
    )
    assert path_exists(os.path.join(cwd, "provisioned"))
    assert created.created_by_runtime and created.provider_type == "local_fs"
    assert created.mode == messages.WORKSPACE_MODE_SHARED_WORKSPACE
    assert created.strategy_type == messages.WORKSPACE_STRATEGY_PROJECT_PRIMARY
    assert created.status == messages.WORKSPACE_STATUS_ACTIVE
    assert created.name == "scratch"
    assert created.config.provision_command == "touch provisioned"
    got = await world.board.workspaces.GetExecutionWorkspace(
        pb.GetExecutionWorkspaceRequest(id=created.id)
    )
    assert got == created
    ops = await world.board.workspaces.ListWorkspaceOperations(
        pb.ListWorkspaceOperationsRequest(workspace_id=created.id)
    )
    assert [(o.phase, o.status) for o in ops.operations] == [
        ("workspace_provision", messages.OPERATION_STATUS_SUCCEEDED)
    ]
    assert await world.count("activity_log") >= 1


async def test_a_failed_provision_names_the_workspace_and_its_operation(suite: Suite) -> None:
    world = await workspace_world(suite)
    error = await expect_error(
        _create(world, config=messages.WorkspaceConfig(provision_command="echo nope >&2; exit 4"))
    )
    assert error.reason == "WORKSPACE_PROVISION_FAILED"
    workspace_id = error.metadata["workspace_id"]
    ops = await world.board.workspaces.ListWorkspaceOperations(
        pb.ListWorkspaceOperationsRequest(workspace_id=workspace_id)
    )
    assert ops.operations[0].status == messages.OPERATION_STATUS_FAILED
    assert ops.operations[0].exit_code == 4


async def test_scenarios_1_32_list_filters_reuse_eligible_and_pages(suite: Suite) -> None:
    world = await workspace_world(suite)
    linked = await _create(world, mode=ISOLATED, source_issue_id=world.issue_id)
    shared = await _create(world)
    others = [await _create(world, mode=ISOLATED) for _ in range(3)]
    closed = await _create(world, mode=ISOLATED)
    await mark_closed(world.db, closed.id)
    by_issue = await world.board.workspaces.ListExecutionWorkspaces(
        pb.ListExecutionWorkspacesRequest(company_id=world.company_id, issue_id=world.issue_id)
    )
    assert [w.id for w in by_issue.workspaces] == [linked.id]
    eligible = await world.board.workspaces.ListExecutionWorkspaces(
        pb.ListExecutionWorkspacesRequest(company_id=world.company_id, reuse_eligible=True)
    )
    assert {w.id for w in eligible.workspaces} == {linked.id, *(o.id for o in others)}
    assert shared.id not in {w.id for w in eligible.workspaces}
    archived = await world.board.workspaces.ListExecutionWorkspaces(
        pb.ListExecutionWorkspacesRequest(
            company_id=world.company_id, statuses=[messages.WORKSPACE_STATUS_ARCHIVED]
        )
    )
    assert [w.id for w in archived.workspaces] == [closed.id]
    seen: list[str] = []
    token = ""
    while True:
        page = await world.board.workspaces.ListExecutionWorkspaces(
            pb.ListExecutionWorkspacesRequest(
                company_id=world.company_id, page_size=2, page_token=token
            )
        )
        seen += [w.id for w in page.workspaces]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 6 and len(set(seen)) == 6
    assert seen[0] == closed.id  # most recently used first
    error = await expect_error(
        world.board.workspaces.ListExecutionWorkspaces(
            pb.ListExecutionWorkspacesRequest(
                company_id=world.company_id, page_size=2, page_token="bm90LWEtdG9rZW4"
            )
        )
    )
    assert error.reason == "INVALID_ARGUMENT"


async def test_update_merges_config_keys_and_deletes_the_config(suite: Suite) -> None:
    world = await workspace_world(suite)
    created = await _create(
        world,
        config=messages.WorkspaceConfig(provision_command="true", teardown_command="true"),
    )
    patch = messages.ExecutionWorkspace(
        id=created.id, config=messages.WorkspaceConfig(cleanup_command="rm -rf build")
    )
    updated = await world.board.workspaces.UpdateExecutionWorkspace(
        pb.UpdateExecutionWorkspaceRequest(
            workspace=patch, update_mask=field_mask_pb2.FieldMask(paths=["config.cleanup_command"])
        )
    )
    assert (updated.config.provision_command, updated.config.cleanup_command) == (
        "true",
        "rm -rf build",
    )
    cleared = await world.board.workspaces.UpdateExecutionWorkspace(
        pb.UpdateExecutionWorkspaceRequest(
            workspace=messages.ExecutionWorkspace(id=created.id),
            update_mask=field_mask_pb2.FieldMask(paths=["config"]),
        )
    )
    assert not cleared.HasField("config") or cleared.config == messages.WorkspaceConfig()
    stored = await fetch_value(
        world.db, "SELECT config FROM workspaces.execution_workspaces WHERE id = :i", i=created.id
    )
    assert stored is None


async def test_scenario_10_agents_cannot_change_host_commands(suite: Suite) -> None:
    world = await workspace_world(suite)
    created = await _create(world, mode=ISOLATED, source_issue_id=world.issue_id)
    before = await world.counts()
    cases = [
        (
            "config.cleanup_command",
            messages.ExecutionWorkspace(
                id=created.id, config=messages.WorkspaceConfig(cleanup_command="rm -rf /")
            ),
        ),
        (
            "config.runtime",
            messages.ExecutionWorkspace(
                id=created.id,
                config=messages.WorkspaceConfig(
                    runtime=messages.WorkspaceRuntime(
                        jobs=[messages.WorkspaceCommand(command="curl x")]
                    )
                ),
            ),
        ),
        ("metadata", messages.ExecutionWorkspace(id=created.id)),
    ]
    cases[2][1].metadata.update({"config": {"provision_command": "evil"}})
    for path, workspace in cases:
        error = await expect_error(
            world.agent.workspaces.UpdateExecutionWorkspace(
                pb.UpdateExecutionWorkspaceRequest(
                    workspace=workspace, update_mask=field_mask_pb2.FieldMask(paths=[path])
                )
            )
        )
        assert (error.code.name, error.reason) == (
            "PERMISSION_DENIED",
            "HOST_COMMANDS_FORBIDDEN",
        ), path
        assert "Agent keys cannot modify host-executed workspace commands" in error.message
    assert await world.counts() == before


async def test_scenario_8_an_agent_cannot_create_a_workspace_with_commands(suite: Suite) -> None:
    world = await workspace_world(suite)
    before = await world.counts()
    error = await expect_error(
        world.agent.workspaces.CreateExecutionWorkspace(
            pb.CreateExecutionWorkspaceRequest(
                company_id=world.company_id,
                cwd=_dir(),
                mode=ISOLATED,
                source_issue_id=world.issue_id,
                config=messages.WorkspaceConfig(runtime=_runtime("node server.js")),
            )
        )
    )
    assert error.reason == "HOST_COMMANDS_FORBIDDEN"
    assert await world.counts() == before


async def test_the_issue_agent_manages_its_workspace_and_no_other_agent_does(suite: Suite) -> None:
    world = await workspace_world(suite)
    created = await world.agent.workspaces.CreateExecutionWorkspace(
        pb.CreateExecutionWorkspaceRequest(
            company_id=world.company_id, cwd=_dir(), mode=ISOLATED, source_issue_id=world.issue_id
        )
    )
    rename = pb.UpdateExecutionWorkspaceRequest(
        workspace=messages.ExecutionWorkspace(id=created.id, name="mine"),
        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
    )
    assert (await world.agent.workspaces.UpdateExecutionWorkspace(rename)).name == "mine"
    stranger = await world.other_agent()
    before = await world.counts()
    error = await expect_error(stranger.workspaces.UpdateExecutionWorkspace(rename))
    assert (error.code.name, error.reason) == ("PERMISSION_DENIED", "WORKSPACE_ACCESS_DENIED")
    assert error.message == "Missing permission to manage workspace runtime services"
    await world.set_issue_status("done")
    error = await expect_error(world.agent.workspaces.UpdateExecutionWorkspace(rename))
    assert error.reason == "WORKSPACE_ACCESS_DENIED"
    assert await world.counts() == before


async def test_viewers_and_other_companies_are_refused(suite: Suite) -> None:
    world = await workspace_world(suite)
    created = await _create(world)
    viewer = suite.clients(board(world.company_id, Role.VIEWER))
    assert (
        await viewer.workspaces.GetExecutionWorkspace(
            pb.GetExecutionWorkspaceRequest(id=created.id)
        )
    ).id == created.id
    error = await expect_error(
        viewer.workspaces.UpdateExecutionWorkspace(
            pb.UpdateExecutionWorkspaceRequest(
                workspace=messages.ExecutionWorkspace(id=created.id, name="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            )
        )
    )
    assert error.reason == "COMPANY_ACCESS_DENIED"
    outsider = suite.clients(board(str(uuid.uuid4())))
    error = await expect_error(
        outsider.workspaces.GetExecutionWorkspace(pb.GetExecutionWorkspaceRequest(id=created.id))
    )
    assert error.reason == "COMPANY_ACCESS_DENIED"


async def test_scenario_11_a_missing_workspace_is_not_found(suite: Suite) -> None:
    world = await workspace_world(suite)
    missing = str(uuid.uuid4())
    calls: list[Awaitable[Any]] = [
        world.board.workspaces.GetExecutionWorkspace(pb.GetExecutionWorkspaceRequest(id=missing)),
        world.board.workspaces.ControlRuntimeServices(
            pb.ControlRuntimeServicesRequest(workspace_id=missing, action=pb.RUNTIME_ACTION_START)
        ),
        world.board.workspaces.ArchiveExecutionWorkspace(
            pb.ArchiveExecutionWorkspaceRequest(workspace_id=missing)
        ),
        world.board.workspaces.GetCloseReadiness(pb.GetCloseReadinessRequest(workspace_id=missing)),
    ]
    for call in calls:
        error = await expect_error(call)
        assert (error.code.name, error.reason) == ("NOT_FOUND", "WORKSPACE_NOT_FOUND")


async def test_reuse_refreshes_changed_commands_and_replaces_a_different_workspace(
    suite: Suite,
) -> None:
    world = await workspace_world(suite)
    cwd = _dir()
    first = await _create(
        world,
        cwd=cwd,
        mode=ISOLATED,
        source_issue_id=world.issue_id,
        reuse_existing=True,
        config=messages.WorkspaceConfig(runtime=_runtime("serve v1")),
    )
    same = await _create(
        world,
        cwd=cwd,
        mode=ISOLATED,
        source_issue_id=world.issue_id,
        reuse_existing=True,
        config=messages.WorkspaceConfig(runtime=_runtime("serve v1")),
    )
    assert same.id == first.id
    refreshed = await _create(
        world,
        cwd=cwd,
        mode=ISOLATED,
        source_issue_id=world.issue_id,
        reuse_existing=True,
        config=messages.WorkspaceConfig(
            provision_command="true", runtime=_runtime("serve v2", "worker")
        ),
    )
    assert refreshed.id == first.id
    assert [s.command for s in refreshed.config.runtime.services] == ["serve v2", "worker"]
    assert refreshed.config.provision_command == "true"
    decisions = await fetch_value(
        world.db,
        """
        SELECT string_agg(metadata->>'decision', ',' ORDER BY started_at)
          FROM workspaces.workspace_operations
         WHERE workspace_id = :w AND phase = 'workspace_config_freshness'
        """,
        w=first.id,
    )
    assert decisions == "reuse,refresh"
    elsewhere = await _create(
        world, cwd=_dir(), mode=ISOLATED, source_issue_id=world.issue_id, reuse_existing=True
    )
    assert elsewhere.id != first.id


async def test_a_closed_workspace_keeps_its_location(suite: Suite) -> None:
    world = await workspace_world(suite)
    created = await _create(world)
    await mark_closed(world.db, created.id)
    error = await expect_error(
        world.board.workspaces.UpdateExecutionWorkspace(
            pb.UpdateExecutionWorkspaceRequest(
                workspace=messages.ExecutionWorkspace(id=created.id, cwd="/elsewhere"),
                update_mask=field_mask_pb2.FieldMask(paths=["cwd"]),
            )
        )
    )
    assert (error.code.name, error.reason) == ("FAILED_PRECONDITION", "WORKSPACE_CLOSED")
    renamed = await world.board.workspaces.UpdateExecutionWorkspace(
        pb.UpdateExecutionWorkspaceRequest(
            workspace=messages.ExecutionWorkspace(id=created.id, name="old"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        )
    )
    assert renamed.name == "old"
