"""GetCloseReadiness: whether a workspace may be archived now, what
warrants a warning, and what archiving will do.

Blocking: an isolated workspace whose issue is still open; a closed workspace; and,
where archiving removes the worktree (``git worktree remove --force``), uncommitted or
untracked files, which would be lost. Warnings: a shared workspace still used by an open
issue, services that will be stopped, commits not merged into the base (the branch is
kept then), a branch behind its base, a git inspection that failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.actor import Actor
from common.sql import Tx
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from workspace_service import access, foreign_reads, git_state, store
from workspace_service.model import RuntimeServiceRecord, WorkspaceRecord
from workspace_service.service_context import ServiceContext
from workspace_service.workspaces import load_workspace, uuid_argument

TERMINAL_ISSUE_STATUSES = ("done", "cancelled")
_STATE = {
    "ready": pb.CLOSE_READINESS_STATE_READY,
    "ready_with_warnings": pb.CLOSE_READINESS_STATE_READY_WITH_WARNINGS,
    "blocked": pb.CLOSE_READINESS_STATE_BLOCKED,
}


@dataclass
class Readiness:
    """The close readiness of one workspace."""

    workspace: WorkspaceRecord
    blocking_reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    planned_actions: list[str] = field(default_factory=list)
    linked_issues: list[pb.LinkedIssue] = field(default_factory=list)
    services: list[RuntimeServiceRecord] = field(default_factory=list)
    git: pb.GitState | None = None

    @property
    def state(self) -> str:
        if self.blocking_reasons:
            return "blocked"
        return "ready_with_warnings" if self.warnings else "ready"

    def to_proto(self) -> pb.CloseReadiness:
        return pb.CloseReadiness(
            workspace_id=self.workspace.id,
            state=_STATE[self.state],
            blocking_reasons=self.blocking_reasons,
            warnings=self.warnings,
            planned_actions=self.planned_actions,
            linked_issues=self.linked_issues,
            is_destructive_close_allowed=not self.blocking_reasons,
            is_shared_workspace=self.workspace.is_shared,
            git=self.git,
            runtime_services=[s.to_proto() for s in self.services],
        )


async def get_close_readiness(
    ctx: ServiceContext, actor: Actor, workspace_id: str
) -> pb.CloseReadiness:
    """The close readiness of a workspace, for anyone who may read its company."""
    canonical = uuid_argument("workspace_id", workspace_id)
    async with ctx.db.unit_of_work() as tx:
        workspace = await load_workspace(tx, canonical)
        access.require_read(actor, workspace)
        readiness = await assess(tx, workspace)
    await add_git_state(readiness)
    return readiness.to_proto()


async def assess(tx: Tx, workspace: WorkspaceRecord) -> Readiness:
    """Everything but the git state (which runs git, outside any transaction)."""
    readiness = Readiness(workspace)
    if not workspace.is_open:
        readiness.blocking_reasons.append(f"The workspace is already closed ({workspace.status}).")
        return readiness
    await _linked_issues(tx, readiness)
    readiness.services = await store.runtime_services(tx, workspace.id)
    live = [s for s in readiness.services if s.is_live]
    config = workspace.config or {}
    readiness.planned_actions.append("archive_record")
    if live:
        readiness.planned_actions.append("stop_runtime_services")
        readiness.warnings.append(f"{_count(len(live), 'runtime service')} will be stopped.")
    if config.get("cleanup_command"):
        readiness.planned_actions.append("cleanup_command")
    if config.get("teardown_command"):
        readiness.planned_actions.append("teardown_command")
    if workspace.is_git_worktree:
        readiness.planned_actions.append("git_worktree_remove")
        if workspace.created_by_runtime:
            readiness.planned_actions.append("git_branch_delete")
    elif workspace.created_by_runtime:
        readiness.planned_actions.append("remove_local_directory")
    return readiness


async def _linked_issues(tx: Tx, readiness: Readiness) -> None:
    workspace = readiness.workspace
    if workspace.source_issue_id is None:
        return
    issue = await foreign_reads.get_issue(tx, workspace.source_issue_id)
    if issue is None:
        return
    terminal = issue["status"] in TERMINAL_ISSUE_STATUSES
    readiness.linked_issues.append(
        pb.LinkedIssue(
            id=str(issue["id"]),
            identifier=issue["identifier"],
            title=issue["title"],
            status=issue["status"],
            is_terminal=terminal,
        )
    )
    if terminal:
        return
    if workspace.is_shared:
        readiness.warnings.append("This shared workspace is still used by an open issue.")
        readiness.warnings.append(
            "Archiving a shared workspace closes its record only; its directory and any "
            "sessions working in it are left in place."
        )
    else:
        readiness.blocking_reasons.append("This workspace is still linked to an open issue.")


async def add_git_state(readiness: Readiness) -> None:
    """Inspect the worktree: lost-work blockers and git warnings."""
    workspace = readiness.workspace
    if not workspace.is_git_worktree or not workspace.is_open:
        return
    state = await git_state.inspect(workspace)
    if isinstance(state, str):
        readiness.warnings.append(f"Could not inspect the git worktree: {state}")
        return
    readiness.git = pb.GitState(
        branch=state.branch or "",
        base_ref=state.base_ref or "",
        ahead=state.ahead,
        behind=state.behind,
        untracked_files=state.untracked_files,
        modified_files=state.modified_files,
        has_unmerged_commits=state.has_unmerged_commits,
    )
    if state.untracked_files:
        readiness.blocking_reasons.append(
            f"The workspace has {_count(state.untracked_files, 'untracked file')}."
        )
    if state.modified_files:
        readiness.blocking_reasons.append(
            f"The workspace has {_count(state.modified_files, 'uncommitted change')}."
        )
    if state.has_unmerged_commits:
        readiness.warnings.append(
            f'The branch "{state.branch}" has {_count(state.ahead, "commit")} not merged '
            f"into {state.base_ref}; the branch will be kept."
        )
    if state.behind:
        readiness.warnings.append(
            f'"{state.branch}" is behind {state.base_ref} by {_count(state.behind, "commit")}.'
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
