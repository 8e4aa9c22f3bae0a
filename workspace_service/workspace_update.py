"""UpdateExecutionWorkspace (AIP-134): change the fields an update mask names.

``config`` replaces the whole config (unset deletes it); ``config.<key>`` merges that
one key. Agents are refused any path that sets host-executed commands
before anything else is looked at (``access``). A closed workspace keeps its location and
config: only its name, metadata and cleanup fields change.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.json_format import MessageToDict

from common.actor import Actor
from common.audit import record_activity
from common.errors import FailedPrecondition
from common.validation import MAX_NAME, Violations, check_timestamp
from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from workspace_service import access, store
from workspace_service.config_validation import check_config
from workspace_service.model import CLOSED_STATUSES, OPEN_STATUSES, STATUS_FROM_PROTO
from workspace_service.service_context import ServiceContext
from workspace_service.workspace_config import (
    COMMAND_KEYS,
    KEYS,
    config_from_proto,
    field_from_proto,
    merge_config,
)
from workspace_service.workspace_create import check_path, check_ref
from workspace_service.workspaces import load_workspace, optional_uuid, workspace_proto

SIMPLE_PATHS = ("name", "cwd", "repo_url", "base_ref", "branch_name", "provider_ref")
OTHER_PATHS = ("status", "cleanup_eligible_at", "cleanup_reason", "metadata", "config")
CONFIG_PATHS = tuple(f"config.{key}" for key in KEYS)
ALLOWED_PATHS = frozenset((*SIMPLE_PATHS, *OTHER_PATHS, *CONFIG_PATHS))
#: What a closed workspace still lets change.
CLOSED_PATHS = frozenset({"name", "metadata", "cleanup_reason", "cleanup_eligible_at"})
_HOST_COMMAND_PATHS = frozenset({*(f"config.{k}" for k in COMMAND_KEYS), "config.runtime"})


async def update_workspace(
    ctx: ServiceContext, actor: Actor, request: pb.UpdateExecutionWorkspaceRequest
) -> messages.ExecutionWorkspace:
    """Apply the masked fields; audited ``execution_workspace.updated``."""
    workspace_in = request.workspace
    paths = list(dict.fromkeys(request.update_mask.paths))
    access.refuse_host_commands(actor, _host_command_paths(paths, workspace_in))
    v = Violations()
    workspace_id = optional_uuid(v, "workspace.id", workspace_in.id, required=True)
    if not paths:
        v.add("update_mask", "must name at least one field")
    for path in paths:
        if path not in ALLOWED_PATHS:
            v.add("update_mask", f"{path!r} cannot be updated")
    changes = _changes(v, paths, workspace_in)
    v.raise_if_any()
    assert workspace_id is not None
    async with ctx.db.unit_of_work() as tx:
        workspace = await load_workspace(tx, workspace_id, for_update=True)
        await access.require_manage(
            tx, actor, company_id=workspace.company_id, issue_id=workspace.source_issue_id
        )
        if actor.is_agent and "config" in paths:
            # Replacing the whole config would drop the board's commands.
            access.refuse_host_commands(
                actor,
                [
                    f"config.{k}"
                    for k in (*COMMAND_KEYS, "runtime")
                    if k in (workspace.config or {})
                ],
            )
        if workspace.status in CLOSED_STATUSES:
            locked = sorted(set(paths) - CLOSED_PATHS)
            if locked:
                raise FailedPrecondition(
                    f"the workspace is closed ({workspace.status}); {', '.join(locked)} "
                    "cannot change",
                    reason="WORKSPACE_CLOSED",
                    metadata={"workspace_id": workspace.id, "status": workspace.status},
                )
        config_paths = [p for p in paths if p == "config" or p.startswith("config.")]
        if config_paths:
            changes["config"] = _new_config(workspace.config, config_paths, workspace_in.config)
        updated = await store.update_workspace(tx, workspace.id, changes)
        record_activity(
            tx,
            actor=actor,
            company_id=workspace.company_id,
            action="execution_workspace.updated",
            entity_type="execution_workspace",
            entity_id=workspace.id,
            details={"changedKeys": sorted(paths)},
        )
        return await workspace_proto(tx, updated)


def _host_command_paths(paths: list[str], workspace: messages.ExecutionWorkspace) -> list[str]:
    named = [p for p in paths if p in _HOST_COMMAND_PATHS]
    if "config" in paths:
        config = config_from_proto(workspace.config) or {}
        named += [f"config.{k}" for k in (*COMMAND_KEYS, "runtime") if k in config]
    if "metadata" in paths and "config" in workspace.metadata.fields:
        named.append("metadata.config")
    return named


def _changes(v: Violations, paths: list[str], ws: messages.ExecutionWorkspace) -> dict[str, Any]:
    """The column values of the non-config paths, validated."""
    changes: dict[str, Any] = {}
    for path in paths:
        if path == "name":
            name = ws.name.strip()
            if not name or len(name) > MAX_NAME:
                v.add("workspace.name", f"must be 1 to {MAX_NAME} characters")
            changes["name"] = name
        elif path in ("cwd", "provider_ref"):
            changes[path] = check_path(v, f"workspace.{path}", getattr(ws, path))
        elif path in ("base_ref", "branch_name"):
            changes[path] = check_ref(v, f"workspace.{path}", getattr(ws, path))
        elif path == "repo_url":
            changes["repo_url"] = ws.repo_url.strip() or None
        elif path == "status":
            status = STATUS_FROM_PROTO.get(ws.status)
            if status not in OPEN_STATUSES:
                v.add(
                    "workspace.status",
                    "must be ACTIVE, IDLE or IN_REVIEW (archive with ArchiveExecutionWorkspace)",
                )
            changes["status"] = status
        elif path == "cleanup_eligible_at":
            changes[path] = (
                check_timestamp(v, "workspace.cleanup_eligible_at", ws.cleanup_eligible_at)
                if ws.HasField("cleanup_eligible_at")
                else None
            )
        elif path == "cleanup_reason":
            changes[path] = ws.cleanup_reason.strip() or None
        elif path == "metadata":
            changes["metadata"] = dict(MessageToDict(ws.metadata))
        elif path == "config":
            if ws.HasField("config"):
                check_config(v, "workspace.config", ws.config)
        elif path.startswith("config."):
            check_config(v, "workspace.config", ws.config)
    return changes


def _new_config(
    current: dict[str, Any] | None, paths: list[str], config: messages.WorkspaceConfig
) -> dict[str, Any] | None:
    if "config" in paths:
        return config_from_proto(config)
    patch = {path.removeprefix("config."): None for path in paths}
    for key in patch:
        patch[key] = field_from_proto(config, key)
    return merge_config(current, patch)
