"""Git worktree workspaces: the branch a workspace works on, the base it
starts from, and the worktree that holds it, created, reused or re-attached.

Every command that changes the repository is a recorded ``worktree_prepare``
operation; inspection runs unrecorded.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field

from common.errors import FailedPrecondition, invalid
from workspace_service import git as g
from workspace_service.model import WorkspaceRecord
from workspace_service.recorder import Recorder

PHASE = "worktree_prepare"
#: The branch name when neither an identifier nor a title gives one.
FALLBACK_BRANCH = "paperclip-work"
MAX_BRANCH_CHARS = 120
#: Where worktrees go, relative to the owner repository's working tree.
WORKTREES_DIR = os.path.join(".paperclip", "worktrees")
#: Keeps the worktrees out of the primary checkout's ``git status``.
_EXCLUDE_LINE = "/.paperclip/"
#: Base refs tried in order when none is configured; each with the ref that proves it.
_BASE_CANDIDATES = (
    ("origin/master", "refs/remotes/origin/master"),
    ("origin/HEAD", "refs/remotes/origin/HEAD"),
    ("origin/main", "refs/remotes/origin/main"),
    ("main", "refs/heads/main"),
    ("master", "refs/heads/master"),
)
_NOT_BRANCH_CHARS = re.compile(r"[^A-Za-z0-9._/-]+")


@dataclass(frozen=True)
class Realized:
    """Where a git worktree workspace lives and how it got there."""

    cwd: str
    repo_root: str
    branch_name: str
    base_ref: str
    #: False when an existing worktree was reused.
    created: bool
    warnings: list[str] = field(default_factory=list)


def branch_name_for(identifier: str | None, title: str | None) -> str:
    """``{identifier}-{slug(title)}`` made a valid branch name of at most 120 characters
    (``PAP-447`` + "Add Worktree Support" → ``PAP-447-add-worktree-support``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", (title or "").lower()).strip("-")
    name = "-".join(part for part in ((identifier or "").strip(), slug) if part)
    name = re.sub(r"-{2,}", "-", _NOT_BRANCH_CHARS.sub("-", name))
    # Git's own ref rules, past the character set: no "..", no empty or dot-led path
    # components, no component ending in ".lock".
    name = re.sub(r"\.{2,}", ".", name)
    components = (c.lstrip(".").removesuffix(".lock") for c in name.split("/"))
    name = "/".join(c for c in components if c)[:MAX_BRANCH_CHARS]
    while name != (trimmed := name.strip("-./").removesuffix(".lock")):
        name = trimmed
    return name or FALLBACK_BRANCH


async def detect_base_ref(repo: str) -> str:
    """The first of origin/master, origin/HEAD, origin/main, main, master that exists in
    ``repo``, else ``HEAD``."""
    for name, ref in _BASE_CANDIDATES:
        if await g.resolves(repo, ref):
            return name
    return "HEAD"


async def realize(
    recorder: Recorder,
    *,
    repo_path: str,
    branch_name: str,
    base_ref: str | None,
    worktree_path: str | None,
) -> Realized:
    """Create, or reuse, the worktree of ``branch_name`` in the repository owning
    ``repo_path`` (default path ``<repo>/.paperclip/worktrees/<branch>``).

    Raises FailedPrecondition ``NOT_A_GIT_REPOSITORY``, ``WORKSPACE_PATH_NOT_REUSABLE``,
    ``BASE_REF_NOT_FOUND`` or ``WORKTREE_PREPARE_FAILED``; InvalidArgument for a branch
    or base ref git would not accept.
    """
    await _check_names(branch_name, base_ref)
    root = await owner_root(repo_path)
    base = base_ref or await detect_base_ref(root)
    warnings = await _fetch_remote_base(recorder, root, base)
    path = worktree_location(root, branch_name, worktree_path)
    entries = await g.worktree_list(root)
    if await g.path_exists(path):
        await _check_reusable(path, branch_name, entries)
        reuse: str | None = path
    else:
        reuse = next((e.path for e in entries if e.branch == branch_name and not e.prunable), None)
    if reuse is not None:
        warnings += await behind_warning(reuse, branch_name, base)
        return Realized(reuse, root, branch_name, base, created=False, warnings=warnings)
    if any(e.prunable and (e.branch == branch_name or g.same_path(e.path, path)) for e in entries):
        # A worktree whose directory was deleted still holds its path and branch.
        await g.recorded_git(recorder, PHASE, "worktree", "prune", cwd=root, step="worktree_prune")
    if g.is_within(path, os.path.join(root, ".paperclip")):
        await _exclude_worktrees(recorder, root)
    await add_worktree(recorder, root=root, path=path, branch=branch_name, base=base)
    return Realized(path, root, branch_name, base, created=True, warnings=warnings)


def worktree_location(root: str, branch: str, worktree_path: str | None) -> str:
    """The worktree's path: ``worktree_path`` (relative to ``root`` unless absolute),
    else ``<root>/.paperclip/worktrees/<branch>``."""
    return os.path.normpath(
        os.path.join(root, worktree_path or os.path.join(WORKTREES_DIR, branch))
    )


async def reattach(recorder: Recorder, workspace: WorkspaceRecord) -> bool:
    """Put a persisted worktree whose directory is gone back at its path, on its branch
    (recreated from the base when the branch is gone too). False when the directory is
    there and nothing was done.

    Raises FailedPrecondition ``WORKSPACE_PATH_MISSING`` (no path or no branch to restore
    from), ``NOT_A_GIT_REPOSITORY`` or ``WORKTREE_PREPARE_FAILED``.
    """
    path = workspace.provider_ref or workspace.cwd
    if not path:
        raise FailedPrecondition(
            "Execution workspace needs a local path before Paperclip can run workspace commands",
            reason="WORKSPACE_PATH_MISSING",
        )
    if await g.is_directory(path):
        return False
    if not workspace.branch_name:
        raise FailedPrecondition(
            f'Worktree "{path}" is missing and the workspace has no branch to restore it from',
            reason="WORKSPACE_PATH_MISSING",
        )
    root = await owner_root(workspace.repo_path or os.path.dirname(path))
    await g.recorded_git(recorder, PHASE, "worktree", "prune", cwd=root, step="worktree_prune")
    base = workspace.base_ref or await detect_base_ref(root)
    await add_worktree(recorder, root=root, path=path, branch=workspace.branch_name, base=base)
    return True


async def owner_root(repo_path: str) -> str:
    """The working tree of the repository owning ``repo_path``; FailedPrecondition
    ``NOT_A_GIT_REPOSITORY`` when there is none."""
    root = await g.repository_root(repo_path) if await g.is_directory(repo_path) else None
    if root is None:
        raise FailedPrecondition(
            f'"{repo_path}" is not a git repository',
            reason="NOT_A_GIT_REPOSITORY",
            metadata={"repo_path": repo_path},
        )
    return root


async def add_worktree(recorder: Recorder, *, root: str, path: str, branch: str, base: str) -> None:
    """``git worktree add``: attach ``branch`` when it exists, else create it from
    ``base``. FailedPrecondition ``BASE_REF_NOT_FOUND`` or ``WORKTREE_PREPARE_FAILED``."""
    if await g.branch_exists(root, branch):
        args: tuple[str, ...] = ("worktree", "add", path, branch)
        step = "worktree_attach"
    elif await g.resolves(root, base):
        args, step = ("worktree", "add", "-b", branch, path, base), "worktree_add"
    else:
        raise FailedPrecondition(
            f'Base ref "{base}" does not name a commit in "{root}"',
            reason="BASE_REF_NOT_FOUND",
            metadata={"base_ref": base},
        )
    op = await g.recorded_git(
        recorder, PHASE, *args, cwd=root, step=step, metadata={"branch": branch, "base_ref": base}
    )
    if not op.succeeded:
        raise FailedPrecondition(
            f'Could not create the worktree "{path}": {g.failure_detail(op)}',
            reason="WORKTREE_PREPARE_FAILED",
            metadata={"operation_id": op.id},
        )


async def behind_warning(cwd: str, branch: str, base: str) -> list[str]:
    """``"<branch>" is behind <base> by N commit(s)`` when the worktree at ``cwd`` lacks
    commits of ``base``; nothing when it is current or the base is unknown."""
    behind = await g.commits_between(cwd, "HEAD", base)
    return [f'"{branch}" is behind {base} by {behind} commit(s)'] if behind else []


async def _check_names(branch: str, base: str | None) -> None:
    # A leading dash would be read as an option by the git commands these go into.
    if (
        branch.startswith("-")
        or not (await g.git("check-ref-format", "--branch", branch, cwd="/")).ok
    ):
        raise invalid("branch_name", f'"{branch}" is not a valid git branch name')
    if base is not None and (not base.strip() or base.startswith("-")):
        raise invalid("base_ref", f'"{base}" is not a valid git ref')


async def _fetch_remote_base(recorder: Recorder, root: str, base: str) -> list[str]:
    remote = base.split("/", 1)[0]
    if "/" not in base or remote not in await g.remotes(root):
        return []
    op = await g.recorded_git(
        recorder,
        PHASE,
        "fetch",
        "--prune",
        remote,
        cwd=root,
        step="fetch",
        timeout=g.NETWORK_TIMEOUT,
    )
    if op.succeeded:
        return []
    return [f'Could not fetch "{remote}" ({g.failure_detail(op)}); using the local {base}']


async def _check_reusable(path: str, branch: str, entries: list[g.WorktreeEntry]) -> None:
    reason: str | None = None
    entry = next((e for e in entries if g.same_path(e.path, path)), None)
    if not await g.is_directory(path):
        reason = "path is not a directory"
    elif entry is None:
        reason = "path is not registered as a git worktree"
    elif (top := await g.git_toplevel(path)) is None or not g.same_path(top, path):
        reason = "path is not the top level of its git worktree"
    elif entry.branch is None:
        reason = f'worktree HEAD is detached instead of on "{branch}"'
    elif entry.branch != branch:
        reason = f'worktree HEAD is on "{entry.branch}" instead of "{branch}"'
    if reason is not None:
        raise FailedPrecondition(
            f'"{path}" is not a reusable git worktree ({reason})',
            reason="WORKSPACE_PATH_NOT_REUSABLE",
            metadata={"path": path},
        )


async def _exclude_worktrees(recorder: Recorder, root: str) -> None:
    common = await g.git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=root)
    exclude = os.path.join(common.out, "info", "exclude")
    if not common.ok or _EXCLUDE_LINE in await asyncio.to_thread(_read_lines, exclude):
        return
    async with recorder.operation(
        PHASE, f"append {_EXCLUDE_LINE} to {exclude}", cwd=root, metadata={"step": "exclude"}
    ) as op:
        await asyncio.to_thread(_append_line, exclude, _EXCLUDE_LINE)
        op.note(f"{_EXCLUDE_LINE} added so the primary checkout does not list worktrees")


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return [line.strip() for line in handle]
    except OSError:
        return []


def _append_line(path: str, line: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        handle.seek(0)
        content = handle.read()
        handle.write(("" if not content or content.endswith("\n") else "\n") + line + "\n")
