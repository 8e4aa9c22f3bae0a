"""A validated ``CreateExecutionWorkspace`` request, as creation and reuse see it."""

from __future__ import annotations

from dataclasses import dataclass

from workspace_service.workspace_config import Config


@dataclass(frozen=True)
class NewWorkspace:
    """A validated CreateExecutionWorkspace request."""

    company_id: str
    name: str
    mode: str
    strategy_type: str
    cwd: str | None
    repo_url: str | None
    repo_path: str | None
    base_ref: str | None
    branch_name: str | None
    source_issue_id: str | None
    project_id: str | None
    config: Config | None
    has_config: bool
    reuse_existing: bool

    @property
    def is_git_worktree(self) -> bool:
        return self.strategy_type == "git_worktree"
