"""The git part of close readiness: untracked and modified files, commits
ahead (and whether they are merged) and behind the base, and inspection failures. Real
git in temporary directories, workspace rows in real PostgreSQL."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from common.db import Database
from tests.harness import Suite, admin, new_company
from tests.workspace_service.git_support import commit, run_git, write
from tests.workspace_service.support import insert_workspace
from workspace_service.git_state import GitState, inspect
from workspace_service.model import WorkspaceRecord

BRANCH = "PAP-6-close-me"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    run_git(tmp_path, "init", "-q", "-b", "main", str(root))
    commit(root, "README.md")
    commit(root, "app.py")
    return root


@pytest.fixture
def worktree(repo: Path) -> Path:
    path = repo.parent / "worktree"
    run_git(repo, "worktree", "add", "-q", "-b", BRANCH, str(path), "main")
    return path


@pytest.fixture
async def company_id(suite: Suite) -> str:
    return (await new_company(suite.clients(admin()))).id


async def workspace_at(
    db: Database, company_id: str, path: Path, base_ref: str | None = "main"
) -> WorkspaceRecord:
    return await insert_workspace(
        db, company_id, cwd=str(path), strategy_type="git_worktree", branch_name=BRANCH,
        repo_path=str(path), base_ref=base_ref,
    )  # fmt: skip


CLEAN = GitState(
    branch=BRANCH, base_ref="main", ahead=0, behind=0, untracked_files=0, modified_files=0,
    has_unmerged_commits=False,
)  # fmt: skip


def clean(**changes: Any) -> GitState:
    """The state of a fresh worktree of ``main``, with ``changes``."""
    return dataclasses.replace(CLEAN, **changes)


async def test_a_fresh_worktree_is_clean(worktree: Path, db: Database, company_id: str) -> None:
    assert await inspect(await workspace_at(db, company_id, worktree)) == clean()


async def test_untracked_files_are_counted_one_by_one(
    worktree: Path, db: Database, company_id: str
) -> None:
    write(worktree / "notes.txt")
    write(worktree / "new" / "deep" / "a.txt")
    write(worktree / "new" / "b.txt")
    write(worktree / ".gitignore", "ignored.log\n")
    write(worktree / "ignored.log")
    state = await inspect(await workspace_at(db, company_id, worktree))
    assert state == clean(untracked_files=4)  # .gitignore itself is untracked


async def test_staged_unstaged_and_renamed_changes_are_modified_files(
    worktree: Path, db: Database, company_id: str
) -> None:
    commit(worktree, "old.txt")
    write(worktree / "README.md", "changed\n")
    write(worktree / "app.py", "staged\n")
    run_git(worktree, "add", "app.py")
    run_git(worktree, "mv", "old.txt", "new.txt")
    state = await inspect(await workspace_at(db, company_id, worktree))
    assert isinstance(state, GitState)
    assert (state.modified_files, state.untracked_files) == (3, 0)


async def test_commits_ahead_are_unmerged_until_the_base_has_their_change(
    repo: Path, worktree: Path, db: Database, company_id: str
) -> None:
    commit(worktree, "feature.txt")
    workspace = await workspace_at(db, company_id, worktree)
    assert await inspect(workspace) == clean(ahead=1, has_unmerged_commits=True)
    # The same change lands on the base by cherry-pick: the branch holds nothing new.
    commit(repo, "other.txt")
    run_git(repo, "cherry-pick", BRANCH)
    assert await inspect(workspace) == clean(ahead=1, behind=2)


async def test_commits_on_the_base_count_as_behind(
    repo: Path, worktree: Path, db: Database, company_id: str
) -> None:
    commit(repo, "later.txt")
    commit(repo, "later2.txt")
    assert await inspect(await workspace_at(db, company_id, worktree)) == clean(behind=2)


async def test_the_base_is_detected_when_the_workspace_has_none(
    worktree: Path, db: Database, company_id: str
) -> None:
    state = await inspect(await workspace_at(db, company_id, worktree, base_ref=None))
    assert state == clean()


async def test_a_detached_head_has_no_branch(worktree: Path, db: Database, company_id: str) -> None:
    run_git(worktree, "checkout", "-q", "--detach")
    assert await inspect(await workspace_at(db, company_id, worktree)) == clean(branch=None)


async def test_what_cannot_be_inspected_is_explained(
    tmp_path: Path, worktree: Path, db: Database, company_id: str
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    missing = tmp_path / "missing"
    cases = {
        plain: f'The workspace path "{plain}" is not a git checkout.',
        missing: f'The workspace path "{missing}" does not exist.',
    }
    for path, message in cases.items():
        assert await inspect(await workspace_at(db, company_id, path)) == message
    unknown_base = await workspace_at(db, company_id, worktree, base_ref="gone")
    assert await inspect(unknown_base) == (
        'The base ref "gone" does not name a commit; the branch was not compared.'
    )
