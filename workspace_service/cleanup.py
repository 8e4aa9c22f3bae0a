"""Removing a closed workspace's artifacts: its cleanup and teardown
commands, then its worktree and the branch Paperclip created, or the directory
Paperclip created for it.

Nothing here raises for a failed step: each failure becomes a warning and the next
step still runs, so one broken command never leaves the rest behind. Work that is not
safely gone stays: an unmerged branch survives ``git branch -d``, and a directory
holding a repository is never deleted.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field

from workspace_service import git as g
from workspace_service.environment import sanitized_env, workspace_env
from workspace_service.model import WorkspaceRecord
from workspace_service.recorder import Recorder

TEARDOWN_PHASE = "workspace_teardown"
WORKTREE_PHASE = "worktree_cleanup"
#: Seconds a cleanup or teardown command may run.
COMMAND_TIMEOUT = 3600.0
#: Characters of stderr quoted in a warning (the operation keeps the rest).
_WARNING_EXCERPT = 300
#: ``./script args`` or ``bash ./script args`` (also ``sh``).
_REPO_SCRIPT = re.compile(
    r"(?P<shell>(?:ba)?sh\s+)?\./(?P<rel>[^\s;&|<>()'\"`$]+)(?P<rest>.*)", re.S
)


@dataclass(frozen=True)
class CleanupResult:
    """Whether the workspace's path is gone, and what was left or went wrong."""

    cleaned: bool
    warnings: list[str] = field(default_factory=list)


async def cleanup(recorder: Recorder, workspace: WorkspaceRecord) -> CleanupResult:
    """Run the workspace's cleanup and teardown commands, then remove its worktree (and
    the runtime-created branch) or its runtime-created directory.

    ``cleaned`` is true when the path is gone, or when the workspace is a directory
    Paperclip did not create (nothing of it is Paperclip's to remove).
    """
    path = (workspace.provider_ref or workspace.cwd) if workspace.is_git_worktree else workspace.cwd
    root = await _repository(workspace, path)
    warnings = await _run_commands(recorder, workspace, path, root)
    if workspace.is_git_worktree:
        warnings += await _remove_worktree(recorder, workspace, path, root)
    elif workspace.created_by_runtime:
        warnings += await _remove_directory(recorder, workspace, path)
    else:
        return CleanupResult(cleaned=True, warnings=warnings)
    return CleanupResult(cleaned=not path or not await g.path_exists(path), warnings=warnings)


def repo_script_command(command: str, repo_root: str | None) -> str:
    """``command`` with a leading ``./x`` (or ``bash ./x``) made ``<repo_root>/x`` when
    that file exists: the script then runs even where the workspace's own checkout
    lacks it (an untracked script, a branch from before it was added)."""
    match = _REPO_SCRIPT.fullmatch(command.strip())
    if not match or not repo_root:
        return command
    target = os.path.join(repo_root, match["rel"])
    if not os.path.isfile(target) or not g.is_within(target, repo_root):
        return command
    return f"{match['shell'] or ''}{shlex.quote(target)}{match['rest']}"


async def _repository(workspace: WorkspaceRecord, path: str | None) -> str | None:
    for candidate in (workspace.repo_path, path):
        if candidate and await g.is_directory(candidate):
            root = await g.repository_root(candidate)
            if root is not None:
                return root
    return None


async def _run_commands(
    recorder: Recorder, workspace: WorkspaceRecord, path: str | None, root: str | None
) -> list[str]:
    config = workspace.config or {}
    steps = (("cleanup_command", "Cleanup"), ("teardown_command", "Teardown"))
    warnings: list[str] = []
    for key, label in steps:
        command = config.get(key)
        if not command:
            continue
        if not path:
            warnings.append(f"Skipped the {label.lower()} command: the workspace has no path")
            continue
        op = await recorder.run_command(
            TEARDOWN_PHASE,
            repo_script_command(command, root),
            cwd=path,
            env={**sanitized_env(), **workspace_env(workspace)},
            timeout=COMMAND_TIMEOUT,
            metadata={"step": key},
        )
        if not op.succeeded:
            ending = f"exit code {op.exit_code}" if op.exit_code is not None else "no exit code"
            detail = op.stderr.excerpt().strip()[-_WARNING_EXCERPT:]
            warnings.append(
                f"{label} command failed ({ending})" + (f": {detail}" if detail else "")
            )
    return warnings


async def _remove_worktree(
    recorder: Recorder, workspace: WorkspaceRecord, path: str | None, root: str | None
) -> list[str]:
    if root is None:
        return [f'Left the worktree "{path}" in place: its repository was not found']
    if path and (
        await g.path_exists(path)
        or any(g.same_path(e.path, path) for e in await g.worktree_list(root))
    ):
        # --force: the workspace is closed, its uncommitted files go with it. Git itself
        # refuses to remove the main working tree or anything that is not a worktree.
        op = await g.recorded_git(
            recorder,
            WORKTREE_PHASE,
            "worktree",
            "remove",
            "--force",
            path,
            cwd=root,
            step="worktree_remove",
        )
        if not op.succeeded:
            return [f'Could not remove the worktree "{path}": {g.failure_detail(op)}']
    branch = workspace.branch_name
    if not workspace.created_by_runtime or not branch or not await g.branch_exists(root, branch):
        return []
    # -d, never -D: git keeps a branch whose commits are not merged.
    op = await g.recorded_git(
        recorder, WORKTREE_PHASE, "branch", "-d", branch, cwd=root, step="branch_delete"
    )
    return [] if op.succeeded else [f'Skipped deleting branch "{branch}": {g.failure_detail(op)}']


async def _remove_directory(
    recorder: Recorder, workspace: WorkspaceRecord, path: str | None
) -> list[str]:
    if not path or not await g.path_exists(path):
        return []
    refusal = await asyncio.to_thread(_refusal, path, workspace.repo_path)
    if refusal is not None:
        return [f'Left "{path}" in place: {refusal}']
    async with recorder.operation(
        TEARDOWN_PHASE,
        f"rm -rf {shlex.quote(path)}",
        cwd=os.path.dirname(path),
        metadata={"step": "remove_local_directory"},
    ) as op:
        try:
            await asyncio.to_thread(_remove, path)
        except OSError as exc:
            op.status = "failed"
            op.stderr.write_text(str(exc))
            return [f'Could not remove "{path}": {exc}']
    return []


def _refusal(path: str, repo: str | None) -> str | None:
    """Why ``path`` must not be deleted, or None."""
    if (repo and g.is_within(repo, path)) or os.path.isdir(os.path.join(path, ".git")):
        return "it contains the repository checkout"
    if g.same_path(path, "/") or g.same_path(path, os.path.expanduser("~")):
        return "it is the root or home directory"
    return None


def _remove(path: str) -> None:
    # A symlink is removed itself; its target is not Paperclip's.
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)
