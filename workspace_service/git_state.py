"""The git part of close readiness: what would be lost or left behind
if a workspace's checkout were removed now.

Read-only and unrecorded. ``GIT_OPTIONAL_LOCKS=0`` keeps ``git status`` from taking
the index lock, so an inspection never gets in the way of an agent's own git commands.
"""

from __future__ import annotations

from dataclasses import dataclass

from workspace_service import git as g
from workspace_service.git_worktree import detect_base_ref
from workspace_service.model import WorkspaceRecord

_READ_ONLY_ENV = {"GIT_OPTIONAL_LOCKS": "0"}


@dataclass(frozen=True)
class GitState:
    """A checkout's branch, its distance from the base, and its uncommitted files."""

    #: None when HEAD is detached.
    branch: str | None
    base_ref: str
    #: Commits on HEAD that the base lacks.
    ahead: int
    #: Commits on the base that HEAD lacks.
    behind: int
    untracked_files: int
    #: Tracked files with staged or unstaged changes (conflicts included).
    modified_files: int
    #: Some commit ahead of the base has no equivalent change in it (``git cherry``), so
    #: deleting the branch would lose work. A branch merged by cherry-pick or rebase
    #: has none.
    has_unmerged_commits: bool


async def inspect(workspace: WorkspaceRecord) -> GitState | str:
    """The git state of the workspace's checkout, or why it could not be read.

    The base is the workspace's ``base_ref``, else the detected one (see
    ``git_worktree.detect_base_ref``).
    """
    path = workspace.cwd
    if not path:
        return "The workspace has no local path to inspect."
    if not await g.is_directory(path):
        return f'The workspace path "{path}" does not exist.'
    if await g.git_toplevel(path) is None:
        return f'The workspace path "{path}" is not a git checkout.'
    base = workspace.base_ref or await detect_base_ref(path)
    if not await g.resolves(path, base):
        return f'The base ref "{base}" does not name a commit; the branch was not compared.'
    status = await _run(path, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    counts = await _run(path, "rev-list", "--left-right", "--count", f"{base}...HEAD")
    cherry = await _run(path, "cherry", base, "HEAD")
    for result in (status, counts, cherry):
        if not result.ok:
            return f"git could not inspect the workspace: {result.stderr.strip()}"
    untracked, modified = _count_status(status.stdout)
    behind, ahead = (int(n) for n in counts.out.split())
    return GitState(
        branch=await g.current_branch(path),
        base_ref=base,
        ahead=ahead,
        behind=behind,
        untracked_files=untracked,
        modified_files=modified,
        has_unmerged_commits=any(line.startswith("+") for line in cherry.out.splitlines()),
    )


async def _run(path: str, *args: str) -> g.GitResult:
    return await g.git(*args, cwd=path, env=g.git_env(_READ_ONLY_ENV))


def _count_status(porcelain_z: str) -> tuple[int, int]:
    """(untracked, modified) from ``git status --porcelain=v1 -z`` output."""
    untracked = modified = 0
    records = iter(porcelain_z.split("\0"))
    for record in records:
        if len(record) < 4:
            continue
        code = record[:2]
        if code == "??":
            untracked += 1
        elif code != "!!":
            modified += 1
        if "R" in code or "C" in code:
            # A rename or copy is followed by its source path as a record of its own.
            next(records, None)
    return untracked, modified
