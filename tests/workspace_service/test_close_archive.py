"""GetCloseReadiness and ArchiveExecutionWorkspace through the real service, with real
directories, git worktrees and service processes."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import psutil

from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from tests.harness import Suite, expect_error, fetch_value
from tests.workspace_service.git_support import commit, new_repo, run_git, write
from tests.workspace_service.support import (
    WorkspaceWorld,
    path_exists,
    service_config,
    workspace_world,
)

READY = pb.CLOSE_READINESS_STATE_READY
WARNINGS = pb.CLOSE_READINESS_STATE_READY_WITH_WARNINGS
BLOCKED = pb.CLOSE_READINESS_STATE_BLOCKED
ISOLATED = messages.WORKSPACE_MODE_ISOLATED_WORKSPACE


async def _readiness(world: WorkspaceWorld, workspace_id: str) -> pb.CloseReadiness:
    return await world.board.workspaces.GetCloseReadiness(
        pb.GetCloseReadinessRequest(workspace_id=workspace_id)
    )


async def _archive(
    world: WorkspaceWorld, workspace_id: str
) -> pb.ArchiveExecutionWorkspaceResponse:
    return await world.board.workspaces.ArchiveExecutionWorkspace(
        pb.ArchiveExecutionWorkspaceRequest(workspace_id=workspace_id)
    )


async def test_scenario_31_a_shared_workspace_with_an_open_issue_only_warns(
    suite: Suite,
) -> None:
    world = await workspace_world(suite)
    created = await world.board.workspaces.CreateExecutionWorkspace(
        pb.CreateExecutionWorkspaceRequest(
            company_id=world.company_id,
            cwd=tempfile.mkdtemp(),
            mode=messages.WORKSPACE_MODE_SHARED_WORKSPACE,
            source_issue_id=world.issue_id,
        )
    )
    readiness = await _readiness(world, created.id)
    assert readiness.state == WARNINGS
    assert readiness.is_shared_workspace and readiness.is_destructive_close_allowed
    assert len(readiness.warnings) == 2
    assert readiness.warnings[0] == "This shared workspace is still used by an open issue."
    assert [i.identifier for i in readiness.linked_issues] == [world.identifier]
    assert not readiness.linked_issues[0].is_terminal
    assert list(readiness.planned_actions) == ["archive_record"]


async def test_an_isolated_workspace_of_an_open_issue_cannot_be_archived(suite: Suite) -> None:
    world = await workspace_world(suite)
    cwd = os.path.join(tempfile.mkdtemp(), "work")
    created = await world.board.workspaces.CreateExecutionWorkspace(
        pb.CreateExecutionWorkspaceRequest(
            company_id=world.company_id,
            cwd=cwd,
            mode=ISOLATED,
            source_issue_id=world.issue_id,
            config=messages.WorkspaceConfig(cleanup_command="touch cleaned"),
        )
    )
    readiness = await _readiness(world, created.id)
    assert readiness.state == BLOCKED
    assert list(readiness.blocking_reasons) == ["This workspace is still linked to an open issue."]
    assert not readiness.is_destructive_close_allowed
    before = await world.counts()
    error = await expect_error(_archive(world, created.id))
    assert (error.code.name, error.reason) == ("FAILED_PRECONDITION", "WORKSPACE_CLOSE_BLOCKED")
    assert error.message == "This workspace is still linked to an open issue."
    assert await world.counts() == before
    assert path_exists(cwd) and not path_exists(os.path.join(cwd, "cleaned"))


async def test_archive_stops_services_releases_leases_and_removes_what_it_made(
    suite: Suite,
) -> None:
    world = await workspace_world(suite)
    cwd = os.path.join(tempfile.mkdtemp(), "work")
    marker = os.path.join(os.path.dirname(cwd), "teardown-ran")
    server: dict[str, Any] = {
        "name": "web",
        "command": f"exec {sys.executable} -m http.server $PORT --bind 127.0.0.1",
        "auto_port": True,
        "url": "http://127.0.0.1:{{port}}/",
    }
    config = service_config(server)
    created = await world.board.workspaces.CreateExecutionWorkspace(
        pb.CreateExecutionWorkspaceRequest(
            company_id=world.company_id,
            cwd=cwd,
            mode=ISOLATED,
            source_issue_id=world.issue_id,
            config=messages.WorkspaceConfig(
                cleanup_command="echo cleaning",
                teardown_command=f"touch {marker}",
                runtime=messages.WorkspaceRuntime(
                    services=[
                        messages.WorkspaceCommand(
                            name="web",
                            command=config["runtime"]["services"][0]["command"],
                            auto_port=True,
                            url="http://127.0.0.1:{{port}}/",
                        )
                    ]
                ),
            ),
        )
    )
    started = await world.board.workspaces.ControlRuntimeServices(
        pb.ControlRuntimeServicesRequest(workspace_id=created.id, action=pb.RUNTIME_ACTION_START)
    )
    pid = started.workspace.runtime_services[0].pid
    lease = await world.board.workspaces.AcquireEnvironmentLease(
        pb.AcquireEnvironmentLeaseRequest(
            company_id=world.company_id,
            environment_id="6f1c0c8e-3a51-4b4e-9d0a-5a4f3c2b1a00",
            workspace_id=created.id,
            run_id=world.run_id,
        )
    )
    await world.set_issue_status("done")
    readiness = await _readiness(world, created.id)
    assert readiness.state == WARNINGS
    assert list(readiness.planned_actions) == [
        "archive_record",
        "stop_runtime_services",
        "cleanup_command",
        "teardown_command",
        "remove_local_directory",
    ]
    assert readiness.warnings[0] == "1 runtime service will be stopped."
    archived = await _archive(world, created.id)
    assert archived.workspace.status == messages.WORKSPACE_STATUS_ARCHIVED
    assert archived.workspace.HasField("closed_at") and not archived.workspace.cleanup_reason
    assert not path_exists(cwd) and path_exists(marker)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert [s.status for s in archived.workspace.runtime_services] == [
        messages.RUNTIME_SERVICE_STATUS_STOPPED
    ]
    status = await fetch_value(
        world.db, "SELECT status FROM workspaces.environment_leases WHERE id = :i", i=lease.id
    )
    assert status == "released"
    phases = await fetch_value(
        world.db,
        "SELECT string_agg(phase, ',' ORDER BY started_at) FROM workspaces.workspace_operations"
        " WHERE workspace_id = :w AND phase = 'workspace_teardown'",
        w=created.id,
    )
    assert phases.count("workspace_teardown") >= 2
    again = await expect_error(_archive(world, created.id))
    assert again.reason == "WORKSPACE_CLOSE_BLOCKED"


async def test_scenario_3_untracked_work_in_a_worktree_blocks_the_archive(suite: Suite) -> None:
    world = await workspace_world(suite)
    repo = str(new_repo(tempfile.mkdtemp(prefix="paperclip-repo-"), "master"))
    created = await world.board.workspaces.CreateExecutionWorkspace(
        pb.CreateExecutionWorkspaceRequest(
            company_id=world.company_id,
            strategy_type=messages.WORKSPACE_STRATEGY_GIT_WORKTREE,
            repo_path=repo,
            source_issue_id=world.issue_id,
        )
    )
    assert created.branch_name.startswith(f"{world.identifier}-add-worktree-support")
    await world.set_issue_status("done")
    write(os.path.join(created.cwd, "notes.txt"), "unsaved\n")
    readiness = await _readiness(world, created.id)
    assert readiness.state == BLOCKED
    assert list(readiness.blocking_reasons) == ["The workspace has 1 untracked file."]
    assert readiness.git.untracked_files == 1
    before = await world.counts()
    error = await expect_error(_archive(world, created.id))
    assert error.message == "The workspace has 1 untracked file."
    assert await world.counts() == before
    assert path_exists(os.path.join(created.cwd, "notes.txt"))


async def test_scenario_18_archive_removes_the_worktree_and_keeps_unmerged_branches(
    suite: Suite,
) -> None:
    world = await workspace_world(suite)
    repo = str(new_repo(tempfile.mkdtemp(prefix="paperclip-repo-"), "master"))
    created = await world.board.workspaces.CreateExecutionWorkspace(
        pb.CreateExecutionWorkspaceRequest(
            company_id=world.company_id,
            strategy_type=messages.WORKSPACE_STRATEGY_GIT_WORKTREE,
            repo_path=repo,
            source_issue_id=world.issue_id,
        )
    )
    commit(created.cwd, "feature.txt")
    await world.set_issue_status("done")
    readiness = await _readiness(world, created.id)
    assert readiness.state == WARNINGS
    assert readiness.git.has_unmerged_commits and readiness.git.ahead == 1
    assert "git_branch_delete" in readiness.planned_actions
    archived = await _archive(world, created.id)
    assert archived.workspace.status == messages.WORKSPACE_STATUS_ARCHIVED
    assert not path_exists(created.cwd)
    assert any("Skipped deleting branch" in w for w in archived.warnings)
    assert run_git(repo, "branch", "--list", created.branch_name)
