"""Artifact cleanup: commands first, each failure a
warning; then the worktree, the runtime-created branch only when merged, or the
runtime-created directory unless it holds the repository. Real git, real PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from common.db import Database
from tests.conftest import Services
from tests.harness import Suite, admin, new_company
from tests.workspace_service.git_support import commit, run_git
from tests.workspace_service.support import insert_workspace
from workspace_service.cleanup import cleanup
from workspace_service.model import WorkspaceRecord
from workspace_service.recorder import Recorder

BRANCH = "PAP-18-clean-up"


def branches(repo: Path) -> list[str]:
    return run_git(repo, "branch", "--format=%(refname:short)").splitlines()


def exists(path: str | Path) -> bool:
    return Path(path).exists()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    run_git(tmp_path, "init", "-q", "-b", "main", str(root))
    commit(root, "README.md")
    return root


@pytest.fixture
async def company_id(suite: Suite) -> str:
    return (await new_company(suite.clients(admin()))).id


async def worktree_workspace(
    db: Database, company_id: str, repo: Path, *, config: dict[str, Any] | None = None
) -> WorkspaceRecord:
    """A runtime-created worktree on a new branch, persisted."""
    path = repo / ".paperclip" / "worktrees" / BRANCH
    run_git(repo, "worktree", "add", "-q", "-b", BRANCH, str(path), "main")
    return await insert_workspace(
        db, company_id, cwd=str(path), strategy_type="git_worktree", branch_name=BRANCH,
        repo_path=str(repo), base_ref="main", created_by_runtime=True, config=config,
    )  # fmt: skip


def bound(services: Services, workspace: WorkspaceRecord) -> Recorder:
    return services.workspace.recorder(
        admin(), company_id=workspace.company_id, workspace_id=workspace.id
    )


async def operations(db: Database, workspace_id: str) -> list[dict[str, Any]]:
    """The workspace's operations, oldest first."""
    async with db.transaction() as conn:
        rows = await conn.execute(
            text(
                "SELECT phase, metadata->>'step' AS step, status, command, stdout"
                " FROM workspaces.workspace_operations"
                " WHERE workspace_id = :w ORDER BY started_at, id"
            ),
            {"w": workspace_id},
        )
        return [dict(row._mapping) for row in rows]


async def test_scenario_18_a_merged_runtime_worktree_is_removed_with_its_branch(
    repo: Path, services: Services, db: Database, company_id: str
) -> None:
    workspace = await worktree_workspace(db, company_id, repo)
    result = await cleanup(bound(services, workspace), workspace)
    assert (result.cleaned, result.warnings) == (True, [])
    assert not exists(str(workspace.cwd))
    assert branches(repo) == ["main"]
    assert run_git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1


async def test_scenario_18_an_unmerged_branch_survives_with_one_warning(
    repo: Path, services: Services, db: Database, company_id: str
) -> None:
    workspace = await worktree_workspace(db, company_id, repo)
    commit(str(workspace.cwd), "unmerged.txt")
    result = await cleanup(bound(services, workspace), workspace)
    assert result.cleaned is True
    [warning] = result.warnings
    assert warning.startswith(f'Skipped deleting branch "{BRANCH}": ')
    assert "not fully merged" in warning
    assert BRANCH in branches(repo)
    assert run_git(repo, "show", f"{BRANCH}:unmerged.txt") == "unmerged.txt"


async def test_scenario_19_cleanup_phases_are_recorded_in_order(
    repo: Path, services: Services, db: Database, company_id: str
) -> None:
    config = {
        "cleanup_command": 'echo "cleanup $PAPERCLIP_WORKSPACE_ID in $(pwd)"',
        "teardown_command": "echo teardown",
    }
    workspace = await worktree_workspace(db, company_id, repo, config=config)
    result = await cleanup(bound(services, workspace), workspace)
    assert (result.cleaned, result.warnings) == (True, [])
    ops = await operations(db, workspace.id)
    assert [(op["phase"], op["step"], op["status"]) for op in ops] == [
        ("workspace_teardown", "cleanup_command", "succeeded"),
        ("workspace_teardown", "teardown_command", "succeeded"),
        ("worktree_cleanup", "worktree_remove", "succeeded"),
        ("worktree_cleanup", "branch_delete", "succeeded"),
    ]
    assert ops[0]["stdout"] == f"cleanup {workspace.id} in {workspace.cwd}\n"
    assert ops[2]["command"] == f"git worktree remove --force {workspace.cwd}"
    assert ops[3]["command"] == f"git branch -d {BRANCH}"


async def test_a_failing_cleanup_command_warns_and_cleanup_continues(
    repo: Path, services: Services, db: Database, company_id: str
) -> None:
    config = {"cleanup_command": "echo 'db still in use' >&2; exit 2", "teardown_command": "true"}
    workspace = await worktree_workspace(db, company_id, repo, config=config)
    result = await cleanup(bound(services, workspace), workspace)
    assert result.cleaned is True
    assert result.warnings == ["Cleanup command failed (exit code 2): db still in use"]
    steps = [(op["step"], op["status"]) for op in await operations(db, workspace.id)]
    assert steps == [
        ("cleanup_command", "failed"),
        ("teardown_command", "succeeded"),
        ("worktree_remove", "succeeded"),
        ("branch_delete", "succeeded"),
    ]


async def test_repo_relative_scripts_run_from_the_repository_root(
    repo: Path, services: Services, db: Database, company_id: str
) -> None:
    # Untracked in the primary checkout, so the worktree itself does not have it.
    script = repo / "teardown.sh"
    script.write_text('#!/bin/sh\necho "torn down with $1"\n')
    script.chmod(0o755)
    config = {"cleanup_command": "./teardown.sh one", "teardown_command": "bash ./teardown.sh two"}
    workspace = await worktree_workspace(db, company_id, repo, config=config)
    result = await cleanup(bound(services, workspace), workspace)
    assert result.warnings == []
    first, second = (await operations(db, workspace.id))[:2]
    assert (first["command"], first["stdout"]) == (f"{script} one", "torn down with one\n")
    assert (second["command"], second["stdout"]) == (f"bash {script} two", "torn down with two\n")


async def test_a_missing_repo_script_is_run_as_written(
    repo: Path, services: Services, db: Database, company_id: str
) -> None:
    workspace = await worktree_workspace(
        db, company_id, repo, config={"cleanup_command": "./nope.sh"}
    )
    result = await cleanup(bound(services, workspace), workspace)
    [warning] = result.warnings
    assert warning.startswith("Cleanup command failed (exit code 127)")
    assert (await operations(db, workspace.id))[0]["command"] == "./nope.sh"


async def test_a_runtime_created_directory_is_removed(
    tmp_path: Path, services: Services, db: Database, company_id: str
) -> None:
    path = tmp_path / "scratch"
    (path / "nested").mkdir(parents=True)
    (path / "nested" / "file.txt").write_text("x")
    workspace = await insert_workspace(db, company_id, cwd=str(path), created_by_runtime=True)
    result = await cleanup(bound(services, workspace), workspace)
    assert (result.cleaned, result.warnings) == (True, [])
    assert not exists(path)
    [op] = await operations(db, workspace.id)
    assert (op["phase"], op["step"], op["status"]) == (
        "workspace_teardown", "remove_local_directory", "succeeded"
    )  # fmt: skip


async def test_a_directory_holding_the_repository_is_kept(
    repo: Path, services: Services, db: Database, company_id: str
) -> None:
    parent = repo.parent
    workspace = await insert_workspace(
        db, company_id, cwd=str(parent), repo_path=str(repo), created_by_runtime=True
    )
    result = await cleanup(bound(services, workspace), workspace)
    assert result.cleaned is False
    assert result.warnings == [f'Left "{parent}" in place: it contains the repository checkout']
    assert exists(repo / "README.md")
    assert await operations(db, workspace.id) == []


async def test_a_directory_paperclip_did_not_create_is_left_alone(
    tmp_path: Path, services: Services, db: Database, company_id: str
) -> None:
    workspace = await insert_workspace(
        db, company_id, cwd=str(tmp_path), config={"teardown_command": "touch torn-down"}
    )
    result = await cleanup(bound(services, workspace), workspace)
    assert (result.cleaned, result.warnings) == (True, [])
    assert exists(tmp_path / "torn-down")
