"""Schemas per service; companies, issues, agents, runs and the audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ISSUE_STATUSES = "'backlog','todo','in_progress','in_review','blocked','done','cancelled'"
RUN_STATUSES = "'queued','running','succeeded','failed','cancelled','timed_out'"

STATEMENTS = [
    "CREATE SCHEMA IF NOT EXISTS issues",
    "CREATE SCHEMA IF NOT EXISTS runs",
    "CREATE SCHEMA IF NOT EXISTS workspaces",
    "CREATE SCHEMA IF NOT EXISTS gateway",
    "CREATE SCHEMA IF NOT EXISTS audit",
    """
    CREATE TABLE issues.companies (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        name text NOT NULL,
        issue_prefix text NOT NULL UNIQUE CHECK (issue_prefix ~ '^[A-Z]{2,10}$'),
        issue_counter bigint NOT NULL DEFAULT 0 CHECK (issue_counter >= 0),
        status text NOT NULL DEFAULT 'active'
            CHECK (status IN ('active', 'paused', 'archived')),
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE runs.agents (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        company_id uuid NOT NULL REFERENCES issues.companies (id),
        name text NOT NULL,
        name_key text NOT NULL,
        role text NOT NULL DEFAULT '',
        status text NOT NULL DEFAULT 'active'
            CHECK (status IN ('active', 'paused', 'terminated')),
        adapter_type text NOT NULL DEFAULT 'process',
        adapter_config jsonb NOT NULL DEFAULT '{}'::jsonb,
        max_concurrent_runs integer NOT NULL DEFAULT 5
            CHECK (max_concurrent_runs BETWEEN 1 AND 100),
        timeout_seconds integer NOT NULL DEFAULT 7200,
        idle_timeout_seconds integer NOT NULL DEFAULT 1800,
        grace_seconds integer NOT NULL DEFAULT 15,
        heartbeat_interval_seconds integer NOT NULL DEFAULT 0,
        wake_on_demand boolean NOT NULL DEFAULT true,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (company_id, name_key)
    )
    """,
    "CREATE INDEX agents_company_idx ON runs.agents (company_id, created_at, id)",
    f"""
    CREATE TABLE runs.heartbeat_runs (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        company_id uuid NOT NULL REFERENCES issues.companies (id),
        agent_id uuid NOT NULL REFERENCES runs.agents (id),
        issue_id uuid,
        status text NOT NULL DEFAULT 'queued' CHECK (status IN ({RUN_STATUSES})),
        invocation_source text,
        wake_reason text,
        wakeup_request_id uuid,
        retry_of_run_id uuid REFERENCES runs.heartbeat_runs (id),
        process_loss_retry_count integer NOT NULL DEFAULT 0,
        process_pid integer,
        process_group_id integer,
        process_started_at timestamptz,
        supervisor_node_id uuid,
        exit_code integer,
        signal text,
        error_code text,
        error text,
        last_activity_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        started_at timestamptz,
        finished_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    "CREATE INDEX heartbeat_runs_agent_status_idx ON runs.heartbeat_runs (agent_id, status)",
    """
    CREATE INDEX heartbeat_runs_active_idx ON runs.heartbeat_runs (status, created_at)
        WHERE status IN ('queued', 'running')
    """,
    """
    CREATE UNIQUE INDEX heartbeat_runs_one_active_per_agent_issue
        ON runs.heartbeat_runs (agent_id, issue_id)
        WHERE status IN ('queued', 'running') AND issue_id IS NOT NULL
    """,
    f"""
    CREATE TABLE issues.issues (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        company_id uuid NOT NULL REFERENCES issues.companies (id),
        issue_number bigint NOT NULL,
        identifier text NOT NULL UNIQUE,
        title text NOT NULL,
        description text NOT NULL DEFAULT '',
        status text NOT NULL DEFAULT 'backlog' CHECK (status IN ({ISSUE_STATUSES})),
        priority text NOT NULL DEFAULT 'medium'
            CHECK (priority IN ('critical', 'high', 'medium', 'low')),
        assignee_agent_id uuid REFERENCES runs.agents (id),
        assignee_user_id text,
        checkout_run_id uuid,
        execution_run_id uuid,
        execution_agent_name_key text,
        execution_locked_at timestamptz,
        parent_issue_id uuid REFERENCES issues.issues (id),
        created_by_agent_id uuid,
        created_by_user_id text,
        create_request_id uuid,
        started_at timestamptz,
        completed_at timestamptz,
        cancelled_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (company_id, issue_number),
        UNIQUE (company_id, create_request_id),
        CHECK (assignee_agent_id IS NULL OR assignee_user_id IS NULL),
        CHECK (status <> 'in_progress'
               OR assignee_agent_id IS NOT NULL OR assignee_user_id IS NOT NULL)
    )
    """,
    "CREATE INDEX issues_company_status_idx ON issues.issues (company_id, status)",
    "CREATE INDEX issues_assignee_idx ON issues.issues (assignee_agent_id, status)",
    """
    CREATE INDEX issues_checkout_run_idx ON issues.issues (checkout_run_id)
        WHERE checkout_run_id IS NOT NULL
    """,
    """
    CREATE INDEX issues_execution_run_idx ON issues.issues (execution_run_id)
        WHERE execution_run_id IS NOT NULL
    """,
    """
    CREATE TABLE issues.issue_blockers (
        issue_id uuid NOT NULL REFERENCES issues.issues (id),
        blocker_issue_id uuid NOT NULL REFERENCES issues.issues (id),
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (issue_id, blocker_issue_id),
        CHECK (issue_id <> blocker_issue_id)
    )
    """,
    "CREATE INDEX issue_blockers_blocker_idx ON issues.issue_blockers (blocker_issue_id)",
    """
    CREATE TABLE issues.issue_comments (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        company_id uuid NOT NULL REFERENCES issues.companies (id),
        issue_id uuid NOT NULL REFERENCES issues.issues (id),
        body text NOT NULL,
        author_type text NOT NULL CHECK (author_type IN ('agent', 'user', 'system')),
        author_agent_id uuid,
        author_user_id text,
        created_by_run_id uuid,
        idempotency_key text,
        created_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (issue_id, idempotency_key)
    )
    """,
    "CREATE INDEX issue_comments_issue_idx ON issues.issue_comments (issue_id, created_at, id)",
    """
    CREATE TABLE issues.issue_events (
        id bigserial PRIMARY KEY,
        company_id uuid NOT NULL,
        issue_id uuid NOT NULL,
        type text NOT NULL,
        actor_type text NOT NULL,
        actor_id text NOT NULL,
        actor_agent_id uuid,
        actor_run_id uuid,
        target_agent_id uuid,
        payload jsonb NOT NULL DEFAULT '{}'::jsonb,
        created_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    "CREATE INDEX issue_events_issue_idx ON issues.issue_events (issue_id, id)",
    """
    CREATE FUNCTION issues.notify_issue_events() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('paperclip_issue_events', '');
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER issue_events_notify AFTER INSERT ON issues.issue_events
        FOR EACH STATEMENT EXECUTE FUNCTION issues.notify_issue_events()
    """,
    """
    CREATE TABLE audit.activity_log (
        id bigserial PRIMARY KEY,
        company_id uuid NOT NULL,
        actor_type text NOT NULL,
        actor_id text NOT NULL,
        agent_id uuid,
        run_id uuid,
        action text NOT NULL,
        entity_type text NOT NULL,
        entity_id text NOT NULL,
        details jsonb NOT NULL DEFAULT '{}'::jsonb,
        created_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    "CREATE INDEX activity_company_idx ON audit.activity_log (company_id, id DESC)",
    """
    CREATE INDEX activity_entity_idx
        ON audit.activity_log (company_id, entity_type, entity_id, id DESC)
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    for schema in ("audit", "gateway", "workspaces", "issues", "runs"):
        op.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
