"""Reuse of an issue's open workspace, and the refresh of its configuration: a reused
workspace picks up changed commands and runtime services.

The request is compared with the open workspace by category. A different mode,
strategy, repository, location, branch, base or environment means the request wants
another workspace: ``replace`` (a new one is made). Otherwise changed lifecycle
commands or runtime services mean ``refresh`` (they are merged in), and no change at
all means ``reuse``. Either way the decision is recorded as a
``workspace_config_freshness`` operation, and the workspace is made available again
(re-attached if its worktree directory was deleted, provisioned).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from common.actor import Actor
from common.audit import record_activity
from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from workspace_service import provisioning, store
from workspace_service.model import WorkspaceRecord
from workspace_service.service_context import ServiceContext
from workspace_service.workspace_config import COMMAND_KEYS, merge_config
from workspace_service.workspace_request import NewWorkspace
from workspace_service.workspaces import workspace_proto

FRESHNESS_PHASE = "workspace_config_freshness"


def decide(existing: WorkspaceRecord, new: NewWorkspace) -> tuple[str, list[str]]:
    """``("reuse" | "refresh" | "replace", the categories that differ)``."""
    different: list[str] = []
    if new.repo_path and new.repo_path not in (existing.repo_path, existing.cwd):
        different.append("repo")
    if new.repo_url and new.repo_url != existing.repo_url:
        different.append("repo")
    if new.cwd and new.cwd != existing.cwd:
        different.append("realization")
    if new.branch_name and new.branch_name != existing.branch_name:
        different.append("realization")
    if new.base_ref and new.base_ref != existing.base_ref:
        different.append("strategy")
    wanted_env = (new.config or {}).get("environment_id")
    if new.has_config and wanted_env != (existing.config or {}).get("environment_id"):
        different.append("environment")
    if different:
        return "replace", sorted(set(different))
    if not new.has_config:
        return "reuse", []
    current = existing.config or {}
    wanted = new.config or {}
    changed: list[str] = []
    if any(current.get(key) != wanted.get(key) for key in COMMAND_KEYS):
        changed.append("lifecycleCommands")
    if current.get("runtime") != wanted.get("runtime"):
        changed.append("runtimeServices")
    return ("refresh", changed) if changed else ("reuse", [])


def refreshed_config(existing: WorkspaceRecord, new: NewWorkspace) -> dict[str, Any] | None:
    """The existing config with the request's commands and runtime merged in."""
    wanted = new.config or {}
    patch = {key: wanted.get(key) for key in (*COMMAND_KEYS, "runtime")}
    return merge_config(existing.config, patch)


async def reuse_open_workspace(
    ctx: ServiceContext, actor: Actor, new: NewWorkspace
) -> messages.ExecutionWorkspace | None:
    """The open workspace of the request's issue, reused or refreshed; None when there is
    none or the request wants a different one."""
    assert new.source_issue_id is not None
    async with ctx.db.unit_of_work() as tx:
        existing = await store.open_workspace_for_issue(
            tx, issue_id=new.source_issue_id, mode=new.mode, strategy_type=new.strategy_type
        )
    if existing is None:
        return None
    decision, categories = decide(existing, new)
    if decision == "replace":
        return None
    recorder = ctx.recorder(
        actor,
        company_id=existing.company_id,
        workspace_id=existing.id,
        issue_id=new.source_issue_id,
    )
    async with recorder.operation(
        FRESHNESS_PHASE,
        f"workspace config {decision}",
        cwd=existing.cwd,
        metadata={"decision": decision, "changed": categories},
    ) as op:
        changes: dict[str, Any] = {"last_used_at": datetime.now(UTC)}
        if existing.status == "idle":
            changes["status"] = "active"
        if decision == "refresh":
            changes["config"] = refreshed_config(existing, new)
            op.note(f"Refreshed {', '.join(categories)} from the request.")
        else:
            op.note("Configuration unchanged; workspace reused.")
        async with ctx.db.unit_of_work() as tx:
            workspace = await store.update_workspace(tx, existing.id, changes)
            record_activity(
                tx,
                actor=actor,
                company_id=workspace.company_id,
                action="execution_workspace.reused",
                entity_type="execution_workspace",
                entity_id=workspace.id,
                details={"decision": decision, "changed": categories},
            )
    await provisioning.ensure_available(recorder, workspace)
    async with ctx.db.unit_of_work() as tx:
        return await workspace_proto(tx, workspace)
