"""Making a persisted workspace usable again before work runs in it, and running its
provision command.

Only git worktree workspaces are provisioned: the provision command belongs to the
worktree strategy, and a plain directory is used as stored.
"""

from __future__ import annotations

import asyncio
import os

from common.errors import FailedPrecondition
from workspace_service import git_worktree
from workspace_service.environment import sanitized_env, workspace_env
from workspace_service.model import WorkspaceRecord
from workspace_service.recorder import Recorder

PHASE = "workspace_provision"
#: Seconds a provision command may run (installing dependencies can be slow).
PROVISION_TIMEOUT = 3600.0
#: Characters of stderr quoted in a failure message (the operation keeps the rest).
_MESSAGE_EXCERPT = 500


async def provision(recorder: Recorder, workspace: WorkspaceRecord) -> None:
    """Run the workspace's ``provision_command`` (if any) in its cwd as one recorded
    ``workspace_provision`` operation.

    Raises FailedPrecondition ``WORKSPACE_PROVISION_FAILED`` (metadata ``operation_id``)
    when it exits non-zero, times out or cannot start.
    """
    command = (workspace.config or {}).get("provision_command")
    if not command or not workspace.cwd:
        return
    op = await recorder.run_command(
        PHASE,
        command,
        cwd=workspace.cwd,
        env={**sanitized_env(), **workspace_env(workspace)},
        timeout=PROVISION_TIMEOUT,
    )
    if op.succeeded:
        return
    ending = f"exit code {op.exit_code}" if op.exit_code is not None else "no exit code"
    detail = op.stderr.excerpt().strip()[-_MESSAGE_EXCERPT:]
    raise FailedPrecondition(
        f"Provision command failed ({ending})" + (f": {detail}" if detail else ""),
        reason="WORKSPACE_PROVISION_FAILED",
        metadata={"operation_id": op.id},
    )


async def ensure_available(recorder: Recorder, workspace: WorkspaceRecord) -> list[str]:
    """Make a persisted workspace's directory usable and return warnings.

    A git worktree whose directory is gone is re-attached on its branch; one that is
    there is checked for drift from its base. Either way it is then provisioned again.
    A runtime-created plain directory that is gone is recreated.

    Raises FailedPrecondition ``WORKSPACE_PATH_MISSING`` (no path, or a missing
    directory Paperclip did not create), and whatever ``reattach`` and ``provision``
    raise.
    """
    if not workspace.cwd:
        raise FailedPrecondition(
            "Execution workspace needs a local path before Paperclip can run workspace commands",
            reason="WORKSPACE_PATH_MISSING",
        )
    if not workspace.is_git_worktree:
        await asyncio.to_thread(_ensure_directory, workspace, workspace.cwd)
        return []
    warnings: list[str] = []
    if not await git_worktree.reattach(recorder, workspace):
        warnings += await _drift(workspace, workspace.cwd)
    await provision(recorder, workspace)
    return warnings


def _ensure_directory(workspace: WorkspaceRecord, path: str) -> None:
    if os.path.isdir(path):
        return
    if not workspace.created_by_runtime:
        # Not ours to recreate: an empty directory would hide that the user's is gone.
        raise FailedPrecondition(
            f'Execution workspace path "{path}" does not exist',
            reason="WORKSPACE_PATH_MISSING",
            metadata={"path": path},
        )
    os.makedirs(path, exist_ok=True)


async def _drift(workspace: WorkspaceRecord, cwd: str) -> list[str]:
    base = workspace.base_ref or await git_worktree.detect_base_ref(cwd)
    branch = workspace.branch_name or "HEAD"
    return await git_worktree.behind_warning(cwd, branch, base)
