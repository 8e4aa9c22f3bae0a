"""SQL of execution workspaces and their runtime service rows, in the unit of work of
the caller (the rows of other services they need are read by ``foreign_reads``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from common.sql import Tx, sql
from workspace_service.model import RuntimeServiceRecord, WorkspaceRecord

_COLUMNS = """
    id, company_id, project_id, source_issue_id, name, mode, strategy_type, status, cwd,
    repo_url, repo_path, base_ref, branch_name, provider_type, provider_ref,
    created_by_runtime, config, metadata, cleanup_reason, last_used_at, opened_at,
    closed_at, cleanup_eligible_at, created_at, updated_at, host
"""
#: Columns a service function may set through ``update_workspace``.
UPDATABLE = frozenset(
    {
        "name",
        "status",
        "cwd",
        "repo_url",
        "repo_path",
        "base_ref",
        "branch_name",
        "provider_ref",
        "created_by_runtime",
        "config",
        "metadata",
        "cleanup_reason",
        "cleanup_eligible_at",
        "closed_at",
        "last_used_at",
    }
)
_JSON_COLUMNS = frozenset({"config", "metadata"})

_GET = sql(f"SELECT {_COLUMNS} FROM workspaces.execution_workspaces WHERE id = :id")
_GET_FOR_UPDATE = sql(
    f"SELECT {_COLUMNS} FROM workspaces.execution_workspaces WHERE id = :id FOR UPDATE"
)
_INSERT = sql(
    f"""
    INSERT INTO workspaces.execution_workspaces (
        company_id, project_id, source_issue_id, name, mode, strategy_type, cwd, repo_url,
        repo_path, base_ref, branch_name, provider_type, provider_ref, created_by_runtime,
        config, metadata, host
    ) VALUES (
        :company_id, :project_id, :source_issue_id, :name, :mode, :strategy_type, :cwd,
        :repo_url, :repo_path, :base_ref, :branch_name, :provider_type, :provider_ref,
        :created_by_runtime, :config::jsonb, :metadata::jsonb, :host
    )
    RETURNING {_COLUMNS}
    """
)
_SERVICES = sql(
    """
    SELECT * FROM workspaces.runtime_services
     WHERE workspace_id = :workspace_id ORDER BY service_index, workspace_command_id
    """
)
_SERVICES_OF = sql(
    """
    SELECT * FROM workspaces.runtime_services
     WHERE workspace_id = ANY(:ids::uuid[])
     ORDER BY workspace_id, service_index, workspace_command_id
    """
)
_OPEN_FOR_ISSUE = sql(
    f"""
    SELECT {_COLUMNS} FROM workspaces.execution_workspaces
     WHERE source_issue_id = :issue_id AND mode = :mode AND strategy_type = :strategy_type
       AND status IN ('active', 'idle', 'in_review')
     ORDER BY last_used_at DESC, id DESC
     LIMIT 1
     FOR UPDATE
    """
)


async def get_workspace(
    tx: Tx, workspace_id: str, *, for_update: bool = False
) -> WorkspaceRecord | None:
    row = await tx.fetchrow(_GET_FOR_UPDATE if for_update else _GET, {"id": workspace_id})
    return None if row is None else WorkspaceRecord.from_row(row)


async def open_workspace_for_issue(
    tx: Tx, *, issue_id: str, mode: str, strategy_type: str
) -> WorkspaceRecord | None:
    """The most recently used open workspace of ``issue_id`` with that mode and strategy,
    row-locked."""
    row = await tx.fetchrow(
        _OPEN_FOR_ISSUE, {"issue_id": issue_id, "mode": mode, "strategy_type": strategy_type}
    )
    return None if row is None else WorkspaceRecord.from_row(row)


async def insert_workspace(tx: Tx, values: Mapping[str, Any]) -> WorkspaceRecord:
    params = dict(values)
    params["config"] = None if params.get("config") is None else json.dumps(params["config"])
    params["metadata"] = json.dumps(params.get("metadata") or {})
    params.setdefault("host", None)
    row = await tx.fetchrow(_INSERT, params)
    assert row is not None
    return WorkspaceRecord.from_row(row)


async def update_workspace(
    tx: Tx, workspace_id: str, changes: Mapping[str, Any]
) -> WorkspaceRecord:
    """Set ``changes`` (columns of ``UPDATABLE``) and ``updated_at``; the new row."""
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise KeyError(f"not updatable: {sorted(unknown)}")
    sets = ["updated_at = now()"]
    params: dict[str, Any] = {"id": workspace_id}
    for column, value in changes.items():
        if column in _JSON_COLUMNS:
            sets.append(f"{column} = :{column}::jsonb")
            params[column] = None if value is None else json.dumps(value)
        else:
            sets.append(f"{column} = :{column}")
            params[column] = value
    query = sql(
        f"UPDATE workspaces.execution_workspaces SET {', '.join(sets)} "
        f"WHERE id = :id RETURNING {_COLUMNS}"
    )
    row = await tx.fetchrow(query, params)
    assert row is not None
    return WorkspaceRecord.from_row(row)


async def list_workspaces(
    tx: Tx,
    *,
    company_id: str,
    project_id: str | None,
    issue_id: str | None,
    statuses: Sequence[str],
    reuse_eligible: bool,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[WorkspaceRecord]:
    """A page of a company's workspaces, most recently used first (keyset on
    ``last_used_at, id``)."""
    where = ["company_id = :company_id"]
    params: dict[str, Any] = {"company_id": company_id, "limit": limit}
    if project_id:
        where.append("project_id = :project_id")
        params["project_id"] = project_id
    if issue_id:
        where.append("source_issue_id = :issue_id")
        params["issue_id"] = issue_id
    if statuses:
        where.append("status = ANY(:statuses::text[])")
        params["statuses"] = list(statuses)
    if reuse_eligible:
        where.append(
            "status IN ('active', 'idle', 'in_review') AND closed_at IS NULL"
            " AND mode <> 'shared_workspace'"
        )
    if after is not None:
        where.append("(last_used_at, id) < (:after_t, :after_id)")
        params["after_t"], params["after_id"] = after
    query = sql(
        f"SELECT {_COLUMNS} FROM workspaces.execution_workspaces WHERE {' AND '.join(where)}"
        " ORDER BY last_used_at DESC, id DESC LIMIT :limit"
    )
    return [WorkspaceRecord.from_row(row) for row in await tx.fetch(query, params)]


async def runtime_services_of(
    tx: Tx, workspace_ids: Sequence[str]
) -> dict[str, list[RuntimeServiceRecord]]:
    """The runtime service records of several workspaces (one query), by workspace."""
    rows = await tx.fetch(_SERVICES_OF, {"ids": list(workspace_ids)})
    out: dict[str, list[RuntimeServiceRecord]] = {w: [] for w in workspace_ids}
    for row in rows:
        record = RuntimeServiceRecord.from_row(row)
        out[record.workspace_id].append(record)
    return out


async def runtime_services(tx: Tx, workspace_id: str) -> list[RuntimeServiceRecord]:
    """The runtime service records of a workspace, by service index."""
    rows = await tx.fetch(_SERVICES, {"workspace_id": workspace_id})
    return [RuntimeServiceRecord.from_row(row) for row in rows]
