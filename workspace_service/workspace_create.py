"""CreateExecutionWorkspace: make a workspace (a directory or a git worktree), record
it, provision it; or, with ``reuse_existing``, hand back the open workspace of the same
issue with its commands and runtime refreshed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.actor import Actor
from common.audit import record_activity
from common.authz import require_company_access
from common.errors import FailedPrecondition, NotFound, PaperclipError
from common.sql import Row, Tx
from common.validation import MAX_NAME, Violations
from paperclip.workspaces.v1 import workspace_messages_pb2 as messages
from paperclip.workspaces.v1 import workspaces_pb2 as pb
from workspace_service import access, foreign_reads, git_worktree, provisioning, reuse, store
from workspace_service.config_validation import check_config
from workspace_service.model import MODE_FROM_PROTO, STRATEGY_FROM_PROTO, WorkspaceRecord
from workspace_service.recorder import Recorder
from workspace_service.service_context import ServiceContext
from workspace_service.workspace_config import config_from_proto, has_host_commands
from workspace_service.workspace_request import NewWorkspace
from workspace_service.workspaces import company_not_found, optional_uuid, workspace_proto

ENTITY_TYPE = "execution_workspace"
MAX_PATH = 4096
MAX_REF = 250


async def create_workspace(
    ctx: ServiceContext, actor: Actor, request: pb.CreateExecutionWorkspaceRequest
) -> messages.ExecutionWorkspace:
    """Create (or reuse) and provision a workspace; audited ``execution_workspace.created``
    (or ``.reused``)."""
    new = parse_request(request)
    require_company_access(actor, new.company_id, write=True)
    access.refuse_host_commands(actor, [f"config.{key}" for key in has_host_commands(new.config)])
    async with ctx.db.unit_of_work() as tx:
        if not await foreign_reads.company_exists(tx, new.company_id):
            raise company_not_found(new.company_id)
        issue = await _issue(tx, new)
        await access.require_manage(
            tx, actor, company_id=new.company_id, issue_id=new.source_issue_id
        )
    if not (new.reuse_existing and new.source_issue_id):
        return await _create(ctx, actor, new, issue)
    # Two reuse requests of one issue must not both find nothing and both create.
    async with ctx.locks.hold(f"issue:{new.source_issue_id}"):
        reused = await reuse.reuse_open_workspace(ctx, actor, new)
        if reused is not None:
            return reused
        return await _create(ctx, actor, new, issue)


async def _create(
    ctx: ServiceContext, actor: Actor, new: NewWorkspace, issue: Row | None
) -> messages.ExecutionWorkspace:
    recorder = ctx.recorder(actor, company_id=new.company_id, issue_id=new.source_issue_id)
    values = await _realize(recorder, new, issue)
    async with ctx.db.unit_of_work() as tx:
        workspace = await store.insert_workspace(tx, {**values, "host": ctx.host})
        record_activity(
            tx,
            actor=actor,
            company_id=new.company_id,
            action="execution_workspace.created",
            entity_type=ENTITY_TYPE,
            entity_id=workspace.id,
            details={
                "mode": workspace.mode,
                "strategy_type": workspace.strategy_type,
                "cwd": workspace.cwd,
                "branch_name": workspace.branch_name,
                "created_by_runtime": workspace.created_by_runtime,
                "source_issue_id": workspace.source_issue_id,
            },
        )
    await recorder.attach_workspace(workspace.id)
    await _provision(recorder.with_workspace(workspace.id), workspace)
    async with ctx.db.unit_of_work() as tx:
        return await workspace_proto(tx, workspace)


async def _provision(recorder: Recorder, workspace: WorkspaceRecord) -> None:
    try:
        await provisioning.provision(recorder, workspace)
    except PaperclipError as exc:
        exc.metadata.setdefault("workspace_id", workspace.id)
        raise


async def _realize(recorder: Recorder, new: NewWorkspace, issue: Row | None) -> dict[str, Any]:
    """Make the directory or worktree; the row's values."""
    values: dict[str, Any] = {
        "company_id": new.company_id,
        "project_id": new.project_id,
        "source_issue_id": new.source_issue_id,
        "name": new.name,
        "mode": new.mode,
        "strategy_type": new.strategy_type,
        "repo_url": new.repo_url,
        "config": new.config,
        "metadata": {},
    }
    if not new.is_git_worktree:
        assert new.cwd is not None
        created = _make_directory(new.cwd)
        values.update(
            cwd=new.cwd,
            repo_path=new.repo_path,
            base_ref=new.base_ref,
            branch_name=new.branch_name,
            provider_type="local_fs",
            provider_ref=None,
            created_by_runtime=created,
        )
        return values
    assert new.repo_path is not None
    branch = new.branch_name or git_worktree.branch_name_for(
        issue["identifier"] if issue else None, issue["title"] if issue else None
    )
    realized = await git_worktree.realize(
        recorder,
        repo_path=new.repo_path,
        branch_name=branch,
        base_ref=new.base_ref,
        worktree_path=new.cwd,
    )
    values.update(
        cwd=realized.cwd,
        repo_path=realized.repo_root,
        base_ref=realized.base_ref,
        branch_name=realized.branch_name,
        provider_type="git_worktree",
        provider_ref=realized.cwd,
        created_by_runtime=realized.created,
        metadata={"warnings": realized.warnings} if realized.warnings else {},
    )
    if not new.name:
        values["name"] = realized.branch_name
    return values


def _make_directory(cwd: str) -> bool:
    """Make ``cwd`` if it is missing; whether it was made here."""
    path = Path(cwd)
    if path.is_dir():
        return False
    if path.exists():
        raise FailedPrecondition(
            f"{cwd} exists and is not a directory",
            reason="WORKSPACE_PATH_NOT_USABLE",
            metadata={"cwd": cwd},
        )
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot create {cwd}: {exc.strerror or exc}",
            reason="WORKSPACE_PATH_NOT_USABLE",
            metadata={"cwd": cwd},
        ) from exc
    return True


async def _issue(tx: Tx, new: NewWorkspace) -> Row | None:
    if new.source_issue_id is None:
        return None
    issue = await foreign_reads.get_issue(tx, new.source_issue_id)
    if issue is None or str(issue["company_id"]) != new.company_id:
        raise NotFound(
            "issue not found",
            reason="ISSUE_NOT_FOUND",
            metadata={"issue_id": new.source_issue_id},
        )
    return issue


def parse_request(request: pb.CreateExecutionWorkspaceRequest) -> NewWorkspace:
    """Validate every field; INVALID_ARGUMENT naming all bad ones."""
    v = Violations()
    company_id = optional_uuid(v, "company_id", request.company_id, required=True)
    source_issue_id = optional_uuid(v, "source_issue_id", request.source_issue_id)
    project_id = optional_uuid(v, "project_id", request.project_id)
    strategy = STRATEGY_FROM_PROTO.get(request.strategy_type, "")
    if request.strategy_type == 0:
        strategy = "project_primary"
    elif not strategy:
        v.add("strategy_type", f"unknown value {request.strategy_type}")
    mode = MODE_FROM_PROTO.get(request.mode, "")
    if request.mode == 0:
        mode = "isolated_workspace" if strategy == "git_worktree" else "shared_workspace"
    elif not mode:
        v.add("mode", f"unknown value {request.mode}")
    name = request.name.strip()
    if len(name) > MAX_NAME:
        v.add("name", f"must be at most {MAX_NAME} characters")
    cwd = check_path(v, "cwd", request.cwd)
    repo_path = check_path(v, "repo_path", request.repo_path)
    if strategy == "git_worktree":
        if repo_path is None:
            v.add("repo_path", "is required for a git_worktree workspace")
        if not request.branch_name.strip() and source_issue_id is None:
            v.add("branch_name", "is required when no source_issue_id names the branch")
    elif strategy and cwd is None:
        v.add("cwd", "is required for a project_primary workspace")
    base_ref = check_ref(v, "base_ref", request.base_ref)
    branch_name = check_ref(v, "branch_name", request.branch_name)
    repo_url = request.repo_url.strip() or None
    if repo_url and len(repo_url) > MAX_PATH:
        v.add("repo_url", f"must be at most {MAX_PATH} characters")
    if request.reuse_existing and source_issue_id is None and not v.items:
        v.add("reuse_existing", "needs source_issue_id")
    has_config = request.HasField("config")
    if has_config:
        check_config(v, "config", request.config)
    v.raise_if_any()
    assert company_id is not None
    return NewWorkspace(
        company_id=company_id,
        name=name or (os.path.basename(cwd.rstrip("/")) if cwd else ""),
        mode=mode,
        strategy_type=strategy,
        cwd=cwd,
        repo_url=repo_url,
        repo_path=repo_path,
        base_ref=base_ref,
        branch_name=branch_name,
        source_issue_id=source_issue_id,
        project_id=project_id,
        config=config_from_proto(request.config) if has_config else None,
        has_config=has_config,
        reuse_existing=request.reuse_existing,
    )


def check_path(v: Violations, field: str, value: str) -> str | None:
    """An absolute, normalized path, or None when empty."""
    stripped = value.strip()
    if not stripped:
        return None
    if len(stripped) > MAX_PATH or "\x00" in stripped:
        v.add(field, f"must be a path of at most {MAX_PATH} characters")
        return None
    if not stripped.startswith("/"):
        v.add(field, "must be an absolute path")
        return None
    return os.path.normpath(stripped)


def check_ref(v: Violations, field: str, value: str) -> str | None:
    """A git ref name, or None when empty."""
    stripped = value.strip()
    if not stripped:
        return None
    bad = (
        len(stripped) > MAX_REF
        or stripped.startswith(("-", "/"))
        or ".." in stripped
        or any(c in stripped for c in " ~^:?*[\\\x00\t\n")
        or stripped.endswith((".lock", "/", "."))
    )
    if bad:
        v.add(field, "must be a valid git ref name")
        return None
    return stripped
