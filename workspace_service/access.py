"""Who may do what to a workspace.

Reads: anyone who may read the company. Changes, runtime control and archiving: board
users with write access, services, or an agent whose open issue the workspace was made
for (its source issue: not done or cancelled, assigned to that agent). Agents never set
or change host-executed commands: the provision, teardown and cleanup commands and the
runtime services and jobs; such a request is refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.actor import Actor
from common.authz import require_company_access
from common.errors import PermissionDenied
from common.sql import Tx
from workspace_service import foreign_reads
from workspace_service.model import WorkspaceRecord

#: Issue statuses in which the issue's agent may manage its workspace.
OPEN_ISSUE_STATUSES = ("backlog", "todo", "in_progress", "in_review", "blocked")


def require_read(actor: Actor, workspace: WorkspaceRecord) -> None:
    """Refuse unless ``actor`` may read the workspace's company."""
    require_company_access(actor, workspace.company_id, write=False)


async def require_manage(tx: Tx, actor: Actor, *, company_id: str, issue_id: str | None) -> None:
    """Refuse unless ``actor`` may change a workspace of ``company_id`` made for
    ``issue_id`` (see the module docstring)."""
    require_company_access(actor, company_id, write=True)
    if not actor.is_agent:
        return
    if issue_id is not None:
        issue = await foreign_reads.get_issue(tx, issue_id)
        if (
            issue is not None
            and str(issue["company_id"]) == company_id
            and issue["status"] in OPEN_ISSUE_STATUSES
            and issue["assignee_agent_id"] is not None
            and str(issue["assignee_agent_id"]) == actor.agent_id
        ):
            return
    raise PermissionDenied(
        "Missing permission to manage workspace runtime services",
        reason="WORKSPACE_ACCESS_DENIED",
        metadata={"company_id": company_id, "issue_id": issue_id or ""},
    )


def refuse_host_commands(actor: Actor, paths: Iterable[str]) -> None:
    """Refuse an agent's request that sets any of ``paths`` (host-executed commands)."""
    named = sorted(set(paths))
    if actor.is_agent and named:
        raise PermissionDenied(
            f"Agent keys cannot modify host-executed workspace commands ({', '.join(named)}).",
            reason="HOST_COMMANDS_FORBIDDEN",
            metadata={"paths": ",".join(named)},
        )
