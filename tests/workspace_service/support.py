"""Seeding for workspace-service tests: workspace rows written straight to the
database, for tests of pieces that run below the RPCs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from common.db import Database
from paperclip.issues.v1 import issues_pb2
from tests.harness import (
    Clients,
    Suite,
    admin,
    agent,
    fetch_value,
    insert_run,
    new_agent,
    new_company,
)
from workspace_service import store
from workspace_service.model import WorkspaceRecord


async def insert_workspace(
    db: Database,
    company_id: str,
    *,
    cwd: str,
    name: str = "workspace",
    mode: str = "isolated_workspace",
    strategy_type: str = "project_primary",
    config: dict[str, Any] | None = None,
    source_issue_id: str | None = None,
    branch_name: str | None = None,
    repo_path: str | None = None,
    base_ref: str | None = None,
    created_by_runtime: bool = False,
) -> WorkspaceRecord:
    """A workspace row as the service would have written it (``config`` in its stored
    form, see ``workspace_service.workspace_config``)."""
    async with db.unit_of_work() as tx:
        return await store.insert_workspace(
            tx,
            {
                "company_id": company_id,
                "project_id": None,
                "source_issue_id": source_issue_id,
                "name": name,
                "mode": mode,
                "strategy_type": strategy_type,
                "cwd": cwd,
                "repo_url": None,
                "repo_path": repo_path,
                "base_ref": base_ref,
                "branch_name": branch_name,
                "provider_type": "git_worktree" if strategy_type == "git_worktree" else "local_fs",
                "provider_ref": cwd if strategy_type == "git_worktree" else None,
                "created_by_runtime": created_by_runtime,
                "config": config,
                "metadata": {},
            },
        )


def service_config(
    *services: dict[str, Any], jobs: list[dict[str, Any]] | None = None, **extra: Any
) -> dict[str, Any]:
    """A stored config with these services and jobs (proto field names)."""
    return {"runtime": {"services": list(services), "jobs": list(jobs or [])}, **extra}


@dataclass
class WorkspaceWorld:
    """A fresh company with a board client, one agent (running ``run_id``) and an open
    issue assigned to that agent."""

    suite: Suite
    company_id: str
    agent_id: str
    run_id: str
    issue_id: str
    identifier: str
    board: Clients
    agent: Clients

    @property
    def db(self) -> Database:
        return self.suite.db

    async def other_agent(self) -> Clients:
        """A second agent of the company, not assigned to the issue."""
        created = await new_agent(self.board, self.company_id)
        run_id = await insert_run(self.db, company_id=self.company_id, agent_id=created.id)
        return self.suite.clients(agent(created.id, self.company_id, run_id))

    async def set_issue_status(self, status: str) -> None:
        async with self.db.transaction() as conn:
            await conn.execute(
                text("UPDATE issues.issues SET status = :s WHERE id = :i"),
                {"s": status, "i": self.issue_id},
            )

    async def count(self, table: str) -> int:
        """Rows of ``workspaces.<table>`` (or ``audit.activity_log``) of this company."""
        name = "audit.activity_log" if table == "activity_log" else f"workspaces.{table}"
        value = await fetch_value(
            self.db, f"SELECT count(*) FROM {name} WHERE company_id = :c", c=self.company_id
        )
        return int(value)

    async def counts(self) -> dict[str, int]:
        """Every table a workspace request may write, for 'nothing was written' checks."""
        tables = (
            "execution_workspaces",
            "workspace_operations",
            "runtime_services",
            "environment_leases",
            "activity_log",
        )
        return {table: await self.count(table) for table in tables}


async def workspace_world(suite: Suite, *, title: str = "Add Worktree Support") -> WorkspaceWorld:
    """See ``WorkspaceWorld``."""
    board_clients = suite.clients(admin())
    company = await new_company(board_clients)
    created = await new_agent(board_clients, company.id)
    issue = await board_clients.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(
            company_id=company.id,
            title=title,
            assignee_agent_id=created.id,
            status=issues_pb2.ISSUE_STATUS_TODO,
        )
    )
    run_id = await insert_run(suite.db, company_id=company.id, agent_id=created.id)
    return WorkspaceWorld(
        suite=suite,
        company_id=company.id,
        agent_id=created.id,
        run_id=run_id,
        issue_id=issue.id,
        identifier=issue.identifier,
        board=board_clients,
        agent=suite.clients(agent(created.id, company.id, run_id)),
    )


async def mark_closed(db: Database, workspace_id: str, status: str = "archived") -> None:
    """Close a workspace row directly, as an archive would have."""
    async with db.transaction() as conn:
        await conn.execute(
            text(
                "UPDATE workspaces.execution_workspaces"
                " SET status = :s, closed_at = now() WHERE id = :i"
            ),
            {"s": status, "i": workspace_id},
        )


def path_exists(path: str) -> bool:
    """Whether ``path`` exists (a plain call, for async tests)."""
    return os.path.exists(path)
