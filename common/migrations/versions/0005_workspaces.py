"""Workspaces: execution workspaces, recorded operations, runtime services, leases.

``runtime_services_port_idx`` reserves a loopback port per host while a service that
holds it is starting or running, so two workspaces never get the same port.
``environment_leases_active_idx`` allows one active lease per (environment, workspace).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

MODES = (
    "'shared_workspace','isolated_workspace','operator_branch','adapter_managed','cloud_sandbox'"
)
WORKSPACE_STATUSES = "'active','idle','in_review','archived','cleanup_failed'"

STATEMENTS = [
    f"""
    CREATE TABLE workspaces.execution_workspaces (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        company_id uuid NOT NULL REFERENCES issues.companies (id),
        project_id uuid,
        source_issue_id uuid REFERENCES issues.issues (id),
        name text NOT NULL,
        mode text NOT NULL CHECK (mode IN ({MODES})),
        strategy_type text NOT NULL CHECK (strategy_type IN ('project_primary', 'git_worktree')),
        status text NOT NULL DEFAULT 'active' CHECK (status IN ({WORKSPACE_STATUSES})),
        cwd text,
        repo_url text,
        repo_path text,
        base_ref text,
        branch_name text,
        provider_type text NOT NULL CHECK (provider_type IN ('local_fs', 'git_worktree')),
        provider_ref text,
        created_by_runtime boolean NOT NULL DEFAULT false,
        config jsonb,
        metadata jsonb NOT NULL DEFAULT '{{}}'::jsonb,
        cleanup_reason text,
        last_used_at timestamptz NOT NULL DEFAULT now(),
        opened_at timestamptz NOT NULL DEFAULT now(),
        closed_at timestamptz,
        cleanup_eligible_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE INDEX execution_workspaces_company_idx
        ON workspaces.execution_workspaces (company_id, last_used_at DESC, id DESC)
    """,
    """
    CREATE INDEX execution_workspaces_issue_idx
        ON workspaces.execution_workspaces (source_issue_id)
        WHERE source_issue_id IS NOT NULL
    """,
    """
    CREATE TABLE workspaces.workspace_operations (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        company_id uuid NOT NULL REFERENCES issues.companies (id),
        workspace_id uuid REFERENCES workspaces.execution_workspaces (id),
        parent_operation_id uuid REFERENCES workspaces.workspace_operations (id),
        run_id uuid,
        issue_id uuid,
        actor_type text NOT NULL,
        actor_id text NOT NULL,
        phase text NOT NULL,
        command text NOT NULL,
        cwd text,
        host text NOT NULL,
        status text NOT NULL DEFAULT 'running'
            CHECK (status IN ('running', 'succeeded', 'failed')),
        exit_code integer,
        stdout text NOT NULL DEFAULT '',
        stderr text NOT NULL DEFAULT '',
        stdout_excerpt text NOT NULL DEFAULT '',
        stderr_excerpt text NOT NULL DEFAULT '',
        stdout_bytes bigint NOT NULL DEFAULT 0,
        stderr_bytes bigint NOT NULL DEFAULT 0,
        stdout_sha256 text NOT NULL DEFAULT '',
        stderr_sha256 text NOT NULL DEFAULT '',
        metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
        started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        finished_at timestamptz
    )
    """,
    """
    CREATE INDEX workspace_operations_workspace_idx
        ON workspaces.workspace_operations (workspace_id, started_at DESC, id DESC)
    """,
    """
    CREATE INDEX workspace_operations_running_idx
        ON workspaces.workspace_operations (host) WHERE status = 'running'
    """,
    """
    CREATE TABLE workspaces.runtime_services (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        company_id uuid NOT NULL REFERENCES issues.companies (id),
        workspace_id uuid NOT NULL REFERENCES workspaces.execution_workspaces (id),
        workspace_command_id text NOT NULL,
        service_name text NOT NULL,
        service_index integer NOT NULL,
        status text NOT NULL DEFAULT 'stopped'
            CHECK (status IN ('starting', 'running', 'stopped', 'failed')),
        health_status text NOT NULL DEFAULT 'unknown'
            CHECK (health_status IN ('unknown', 'healthy', 'unhealthy')),
        command text NOT NULL,
        cwd text NOT NULL,
        port integer CHECK (port IS NULL OR port BETWEEN 1 AND 65535),
        url text,
        host text NOT NULL,
        pid integer,
        pgid integer,
        create_time double precision,
        log_path text,
        started_by_run_id uuid,
        last_error text,
        started_at timestamptz,
        stopped_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (workspace_id, workspace_command_id)
    )
    """,
    """
    CREATE UNIQUE INDEX runtime_services_port_idx ON workspaces.runtime_services (host, port)
        WHERE port IS NOT NULL AND status IN ('starting', 'running')
    """,
    """
    CREATE INDEX runtime_services_live_idx ON workspaces.runtime_services (host)
        WHERE status IN ('starting', 'running')
    """,
    """
    CREATE TABLE workspaces.environment_leases (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        company_id uuid NOT NULL REFERENCES issues.companies (id),
        environment_id uuid NOT NULL,
        workspace_id uuid NOT NULL REFERENCES workspaces.execution_workspaces (id),
        issue_id uuid,
        run_id uuid,
        status text NOT NULL DEFAULT 'active'
            CHECK (status IN ('active', 'released', 'expired', 'failed')),
        lease_policy text NOT NULL DEFAULT 'ephemeral'
            CHECK (lease_policy IN ('ephemeral', 'reuse_by_environment')),
        provider text NOT NULL DEFAULT 'local',
        provider_lease_id text,
        -- Who took the lease (the audit identity): a run-less lease belongs to it.
        holder_type text NOT NULL,
        holder_id text NOT NULL,
        ttl_seconds integer NOT NULL CHECK (ttl_seconds > 0),
        expires_at timestamptz NOT NULL,
        released_at timestamptz,
        failure_reason text,
        created_at timestamptz NOT NULL DEFAULT now(),
        renewed_at timestamptz NOT NULL DEFAULT now(),
        CHECK ((status = 'active') = (released_at IS NULL))
    )
    """,
    """
    CREATE UNIQUE INDEX environment_leases_active_idx
        ON workspaces.environment_leases (environment_id, workspace_id) WHERE status = 'active'
    """,
    """
    CREATE INDEX environment_leases_run_idx
        ON workspaces.environment_leases (run_id) WHERE status = 'active'
    """,
    """
    CREATE INDEX environment_leases_expiry_idx
        ON workspaces.environment_leases (expires_at) WHERE status = 'active'
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    for table in (
        "environment_leases",
        "runtime_services",
        "workspace_operations",
        "execution_workspaces",
    ):
        op.execute(f"DROP TABLE IF EXISTS workspaces.{table}")
