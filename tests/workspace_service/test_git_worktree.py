"""Git worktree workspaces: branch names, the
detected base, creating, reusing and refusing worktrees, re-attaching a deleted one and
provisioning it again. Real git in temporary directories, real PostgreSQL."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from common.db import Database
from common.errors import FailedPrecondition, InvalidArgument
from tests.conftest import Services
from tests.harness import Suite, admin, new_company
from tests.workspace_service.git_support import commit, run_git
from tests.workspace_service.support import insert_workspace
from workspace_service import git_worktree, provisioning
from workspace_service.git import git
from workspace_service.git_worktree import branch_name_for, detect_base_ref, realize
from workspace_service.model import WorkspaceRecord
from workspace_service.recorder import Recorder

BRANCH = "PAP-447-add-worktree-support"


def read_text(*parts: str) -> str:
    return Path(*parts).read_text()


def exists(*parts: str) -> bool:
    return Path(*parts).exists()


def new_repo(path: Path, branch: str = "main") -> Path:
    run_git(path.parent, "init", "-q", "-b", branch, str(path))
    commit(path, "README.md")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return new_repo(tmp_path / "repo")


@pytest.fixture
async def company_id(suite: Suite) -> str:
    return (await new_company(suite.clients(admin()))).id


@pytest.fixture
def recorder(services: Services, company_id: str) -> Recorder:
    return services.workspace.recorder(admin(), company_id=company_id)


async def recorded_steps(db: Database, company_id: str) -> list[tuple[str, str, str]]:
    """(phase, metadata step, status) of the company's operations, oldest first."""
    async with db.transaction() as conn:
        rows = await conn.execute(
            text(
                "SELECT phase, metadata->>'step', status FROM workspaces.workspace_operations"
                " WHERE company_id = :c ORDER BY started_at, id"
            ),
            {"c": company_id},
        )
        return [(r[0], r[1], r[2]) for r in rows]


async def realize_in(
    recorder: Recorder,
    repo: Path | str,
    *,
    branch: str = BRANCH,
    base_ref: str | None = "main",
    worktree_path: Path | None = None,
) -> git_worktree.Realized:
    """``realize`` with this module's defaults."""
    return await realize(
        recorder,
        repo_path=str(repo),
        branch_name=branch,
        base_ref=base_ref,
        worktree_path=None if worktree_path is None else str(worktree_path),
    )


@pytest.mark.parametrize(
    ("identifier", "title", "expected"),
    [
        ("PAP-447", "Add Worktree Support", BRANCH),
        ("PAP-1", "Fix: the *bug* -- now!", "PAP-1-fix-the-bug-now"),
        ("team/PAP 2", None, "team/PAP-2"),
        ("-PAP..3.lock", "", "PAP.3"),
        (None, "Ünïcode only", "n-code-only"),
        (None, None, "paperclip-work"),
        ("  ", "!!!", "paperclip-work"),
    ],
)
def test_branch_name_for_gives_a_valid_branch(
    identifier: str | None, title: str | None, expected: str
) -> None:
    name = branch_name_for(identifier, title)
    assert name == expected
    run_git("/", "check-ref-format", "--branch", name)


def test_branch_name_for_caps_the_length_at_120() -> None:
    name = branch_name_for("PAP-9", "word " * 60)
    assert len(name) <= 120 and name.startswith("PAP-9-word-word")
    assert not name.endswith("-")


async def test_scenario_13_realize_creates_then_reuses_the_issue_worktree(
    repo: Path, recorder: Recorder, db: Database, company_id: str
) -> None:
    branch = branch_name_for("PAP-447", "Add Worktree Support")
    first = await realize_in(recorder, repo, branch=branch, base_ref=None)
    second = await realize_in(recorder, repo, branch=branch, base_ref=None)
    expected = str(repo / ".paperclip" / "worktrees" / BRANCH)
    assert (first.cwd, first.created, first.branch_name) == (expected, True, BRANCH)
    assert first.base_ref == "main"
    assert (second.cwd, second.created, second.warnings) == (expected, False, [])
    assert run_git(expected, "symbolic-ref", "--short", "HEAD") == BRANCH
    # The primary checkout does not list the worktrees as untracked files.
    assert run_git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert await recorded_steps(db, company_id) == [
        ("worktree_prepare", "exclude", "succeeded"),
        ("worktree_prepare", "worktree_add", "succeeded"),
    ]


async def test_scenario_14_reuse_warns_when_the_base_moved_ahead(
    repo: Path, recorder: Recorder
) -> None:
    await realize_in(recorder, repo)
    commit(repo, "later.txt")
    again = await realize_in(recorder, repo)
    assert again.created is False
    assert again.warnings == [f'"{BRANCH}" is behind main by 1 commit(s)']


async def test_scenario_15_a_path_that_is_not_a_reusable_worktree_is_refused(
    repo: Path, tmp_path: Path, recorder: Recorder
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong = tmp_path / "wrong"
    run_git(repo, "worktree", "add", "-q", "-b", "unexpected-branch", str(wrong), "main")
    stale = repo / ".paperclip" / "worktrees" / "stale"
    run_git(repo, "worktree", "add", "-q", "-b", "stale", str(stale), "main")
    for entry in stale.iterdir():  # the directory stays, its checkout is gone
        entry.unlink()
    cases = {
        empty: "(path is not registered as a git worktree)",
        wrong: '(worktree HEAD is on "unexpected-branch" instead of "expected")',
        stale: "(path is not the top level of its git worktree)",
    }
    for path, reason in cases.items():
        with pytest.raises(FailedPrecondition) as info:
            await realize_in(recorder, repo, branch="expected", worktree_path=path)
        assert info.value.reason == "WORKSPACE_PATH_NOT_REUSABLE"
        assert info.value.message == f'"{path}" is not a reusable git worktree {reason}'


async def test_scenario_16_a_worktree_given_as_the_repository_is_reused_not_nested(
    repo: Path, recorder: Recorder
) -> None:
    issue = await realize_in(recorder, repo)
    again = await realize_in(recorder, issue.cwd)
    assert (again.cwd, again.repo_root, again.created) == (issue.cwd, str(repo), False)
    assert not exists(issue.cwd, ".paperclip")


async def test_scenario_17_origin_master_wins_even_when_origin_head_is_main(
    tmp_path: Path, recorder: Recorder, db: Database, company_id: str
) -> None:
    seed = new_repo(tmp_path / "seed")
    run_git(seed, "branch", "master")
    commit(seed, "main-only.txt")
    origin = tmp_path / "origin.git"
    run_git(tmp_path, "clone", "-q", "--bare", str(seed), str(origin))
    clone = tmp_path / "clone"
    run_git(tmp_path, "clone", "-q", str(origin), str(clone))
    assert run_git(clone, "symbolic-ref", "--short", "refs/remotes/origin/HEAD") == "origin/main"

    assert await detect_base_ref(str(clone)) == "origin/master"
    realized = await realize_in(recorder, clone, base_ref=None)
    assert (realized.base_ref, realized.warnings) == ("origin/master", [])
    assert run_git(realized.cwd, "rev-parse", "HEAD") == run_git(seed, "rev-parse", "master")
    steps = [step for _phase, step, _status in await recorded_steps(db, company_id)]
    assert steps == ["fetch", "exclude", "worktree_add"]


async def test_detect_base_ref_falls_back_to_local_branches_then_head(tmp_path: Path) -> None:
    assert await detect_base_ref(str(new_repo(tmp_path / "m", "master"))) == "master"
    trunk = new_repo(tmp_path / "t", "trunk")
    assert await detect_base_ref(str(trunk)) == "HEAD"
    run_git(trunk, "branch", "main")
    assert await detect_base_ref(str(trunk)) == "main"


async def test_a_failed_fetch_only_warns(repo: Path, tmp_path: Path, recorder: Recorder) -> None:
    run_git(repo, "remote", "add", "origin", str(tmp_path / "gone.git"))
    run_git(repo, "update-ref", "refs/remotes/origin/main", "HEAD")
    realized = await realize_in(recorder, repo, base_ref="origin/main")
    assert realized.created is True
    [warning] = realized.warnings
    assert (
        warning.startswith('Could not fetch "origin" (')
        and "using the local origin/main" in warning
    )


async def test_an_existing_branch_is_attached_at_its_own_commit(
    repo: Path, recorder: Recorder
) -> None:
    run_git(repo, "checkout", "-q", "-b", BRANCH)
    tip = commit(repo, "work.txt")
    run_git(repo, "checkout", "-q", "main")
    realized = await realize_in(recorder, repo)
    assert realized.created is True
    assert run_git(realized.cwd, "rev-parse", "HEAD") == tip


async def test_a_worktree_registered_for_the_branch_elsewhere_is_reused(
    repo: Path, tmp_path: Path, recorder: Recorder
) -> None:
    elsewhere = str(tmp_path / "elsewhere")
    run_git(repo, "worktree", "add", "-q", "-b", BRANCH, elsewhere, "main")
    realized = await realize_in(recorder, repo)
    assert (realized.cwd, realized.created) == (elsewhere, False)


async def test_bad_repositories_refs_and_names_are_refused(
    repo: Path, tmp_path: Path, recorder: Recorder
) -> None:
    with pytest.raises(FailedPrecondition) as info:
        await realize_in(recorder, tmp_path, base_ref=None)
    assert info.value.reason == "NOT_A_GIT_REPOSITORY"
    with pytest.raises(FailedPrecondition) as info:
        await realize_in(recorder, repo, base_ref="nope")
    assert info.value.reason == "BASE_REF_NOT_FOUND"
    with pytest.raises(InvalidArgument):
        await realize_in(recorder, repo, branch="-f")
    assert not (repo / ".paperclip" / "worktrees" / BRANCH).exists()


async def _persisted(
    services: Services, db: Database, company_id: str, repo: Path, provision: str
) -> tuple[WorkspaceRecord, Recorder]:
    """A runtime-created worktree workspace as a realize would have persisted it."""
    realized = await realize_in(services.workspace.recorder(admin(), company_id=company_id), repo)
    workspace = await insert_workspace(
        db, company_id, cwd=realized.cwd, strategy_type="git_worktree", branch_name=BRANCH,
        repo_path=str(repo), base_ref="main", created_by_runtime=True,
        config={"provision_command": provision},
    )  # fmt: skip
    recorder = services.workspace.recorder(
        admin(), company_id=company_id, workspace_id=workspace.id
    )
    return workspace, recorder


async def test_scenario_20_a_deleted_worktree_is_reattached_and_provisioned_again(
    repo: Path, services: Services, db: Database, company_id: str
) -> None:
    command = 'echo "$PAPERCLIP_WORKSPACE_BRANCH" >> .provisioned'
    workspace, recorder = await _persisted(services, db, company_id, repo, command)
    assert workspace.cwd is not None
    head = commit(workspace.cwd, "work.txt")
    # Deleted by hand: git still has the worktree registered.
    shutil.rmtree(workspace.cwd)

    assert await provisioning.ensure_available(recorder, workspace) == []
    assert run_git(workspace.cwd, "rev-parse", "HEAD") == head
    assert run_git(workspace.cwd, "symbolic-ref", "--short", "HEAD") == BRANCH
    assert read_text(workspace.cwd, ".provisioned") == f"{BRANCH}\n"
    steps = [(phase, step) for phase, step, _ in await recorded_steps(db, company_id)][-3:]
    assert steps == [
        ("worktree_prepare", "worktree_prune"),
        ("worktree_prepare", "worktree_attach"),
        ("workspace_provision", None),
    ]


async def test_reattach_recreates_a_deleted_branch_from_the_base(
    repo: Path, services: Services, db: Database, company_id: str
) -> None:
    workspace, recorder = await _persisted(services, db, company_id, repo, "true")
    assert workspace.cwd is not None
    run_git(repo, "worktree", "remove", "--force", workspace.cwd)
    run_git(repo, "branch", "-D", BRANCH)
    assert await git_worktree.reattach(recorder, workspace) is True
    assert await git_worktree.reattach(recorder, workspace) is False
    assert run_git(workspace.cwd, "rev-parse", "HEAD") == run_git(repo, "rev-parse", "main")
    assert run_git(workspace.cwd, "symbolic-ref", "--short", "HEAD") == BRANCH


async def test_ensure_available_checks_drift_and_provisions_again(
    repo: Path, services: Services, db: Database, company_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERCLIP_SECRET_FOR_TEST", "leak")
    monkeypatch.setenv("npm_config_token", "leak")
    workspace, recorder = await _persisted(services, db, company_id, repo, "env > env.txt")
    commit(repo, "later.txt")
    warnings = await provisioning.ensure_available(recorder, workspace)
    assert warnings == [f'"{BRANCH}" is behind main by 1 commit(s)']
    env = read_text(str(workspace.cwd), "env.txt")
    assert f"PAPERCLIP_WORKSPACE_ID={workspace.id}\n" in env
    assert "leak" not in env


async def test_a_failed_provision_names_its_exit_code_stderr_and_operation(
    repo: Path, services: Services, db: Database, company_id: str
) -> None:
    workspace, recorder = await _persisted(
        services, db, company_id, repo, "echo installing; echo 'no lockfile' >&2; exit 4"
    )
    with pytest.raises(FailedPrecondition) as info:
        await provisioning.provision(recorder, workspace)
    assert info.value.reason == "WORKSPACE_PROVISION_FAILED"
    assert info.value.message == "Provision command failed (exit code 4): no lockfile"
    async with db.transaction() as conn:
        row = (
            await conn.execute(
                text("SELECT phase, status FROM workspaces.workspace_operations WHERE id = :i"),
                {"i": info.value.metadata["operation_id"]},
            )
        ).one()
    assert tuple(row) == ("workspace_provision", "failed")


async def test_ensure_available_for_plain_directories(
    tmp_path: Path, db: Database, company_id: str, recorder: Recorder
) -> None:
    ours = await insert_workspace(
        db, company_id, cwd=str(tmp_path / "ours"), created_by_runtime=True
    )
    assert await provisioning.ensure_available(recorder, ours) == []
    assert (tmp_path / "ours").is_dir()

    theirs = await insert_workspace(db, company_id, cwd=str(tmp_path / "theirs"))
    with pytest.raises(FailedPrecondition) as info:
        await provisioning.ensure_available(recorder, theirs)
    assert info.value.reason == "WORKSPACE_PATH_MISSING"
    assert not (tmp_path / "theirs").exists()

    with pytest.raises(FailedPrecondition) as info:
        await provisioning.ensure_available(recorder, dataclasses.replace(ours, cwd=None))
    assert info.value.reason == "WORKSPACE_PATH_MISSING"
    assert info.value.message == (
        "Execution workspace needs a local path before Paperclip can run workspace commands"
    )


async def test_the_unrecorded_runner_reports_failures_instead_of_raising(tmp_path: Path) -> None:
    missing = await git("status", cwd=str(tmp_path / "missing"))
    assert missing.code == 127 and "could not run git" in missing.stderr
    hung = await git("-c", "alias.hang=!sleep 30", "hang", cwd=str(tmp_path), timeout=0.2)
    assert (
        hung.code == -9
        and hung.stderr == "git -c 'alias.hang=!sleep 30' hang timed out after 0.2 s"
    )
