"""Runs: wakeup requests, run events, runtime state, supervisor nodes, outbox cursors.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

WAKE_STATUSES = (
    "'queued','deferred','claimed','coalesced','skipped','completed','failed','cancelled'"
)
SOURCES = "'on_demand','assignment','timer','automation'"

STATEMENTS = [
    f"""
    ALTER TABLE runs.heartbeat_runs
        ADD COLUMN trigger_detail text,
        ADD COLUMN context jsonb NOT NULL DEFAULT '{{}}'::jsonb,
        ADD COLUMN retry_reason text,
        ADD COLUMN stdout_bytes bigint NOT NULL DEFAULT 0,
        ADD COLUMN stderr_bytes bigint NOT NULL DEFAULT 0,
        ADD COLUMN log_truncated boolean NOT NULL DEFAULT false,
        ADD COLUMN last_output_at timestamptz,
        ADD COLUMN next_event_seq bigint NOT NULL DEFAULT 1,
        ADD COLUMN timeout_seconds integer,
        ADD COLUMN idle_timeout_seconds integer,
        ADD COLUMN grace_seconds integer,
        ADD CONSTRAINT heartbeat_runs_source_check
            CHECK (invocation_source IS NULL OR invocation_source IN ({SOURCES}))
    """,
    """
    CREATE INDEX heartbeat_runs_queued_idx ON runs.heartbeat_runs (agent_id, created_at)
        WHERE status = 'queued'
    """,
    """
    CREATE INDEX heartbeat_runs_node_running_idx ON runs.heartbeat_runs (supervisor_node_id)
        WHERE status = 'running'
    """,
    "CREATE INDEX heartbeat_runs_issue_idx ON runs.heartbeat_runs (issue_id, created_at)",
    "CREATE INDEX heartbeat_runs_company_idx ON runs.heartbeat_runs (company_id, created_at, id)",
    f"""
    CREATE TABLE runs.wakeup_requests (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        company_id uuid NOT NULL REFERENCES issues.companies (id),
        agent_id uuid NOT NULL REFERENCES runs.agents (id),
        source text NOT NULL CHECK (source IN ({SOURCES})),
        reason text NOT NULL DEFAULT '',
        issue_id uuid,
        payload jsonb NOT NULL DEFAULT '{{}}'::jsonb,
        status text NOT NULL CHECK (status IN ({WAKE_STATUSES})),
        skip_reason text,
        coalesced_count integer NOT NULL DEFAULT 0,
        run_id uuid REFERENCES runs.heartbeat_runs (id),
        idempotency_key text,
        source_event_id bigint,
        requested_by_actor_type text,
        requested_by_actor_id text,
        requested_by_run_id uuid,
        requested_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz,
        UNIQUE (agent_id, idempotency_key)
    )
    """,
    """
    CREATE UNIQUE INDEX wakeup_requests_one_deferred_per_agent_issue
        ON runs.wakeup_requests (agent_id, issue_id) WHERE status = 'deferred'
    """,
    """
    CREATE INDEX wakeup_requests_deferred_issue_idx
        ON runs.wakeup_requests (issue_id, requested_at) WHERE status = 'deferred'
    """,
    "CREATE INDEX wakeup_requests_run_idx ON runs.wakeup_requests (run_id)",
    """
    CREATE TABLE runs.run_events (
        run_id uuid NOT NULL REFERENCES runs.heartbeat_runs (id) ON DELETE CASCADE,
        seq bigint NOT NULL,
        type text NOT NULL CHECK (type IN ('lifecycle', 'stdout', 'stderr', 'error')),
        message text NOT NULL DEFAULT '',
        payload jsonb NOT NULL DEFAULT '{}'::jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (run_id, seq)
    )
    """,
    """
    CREATE TABLE runs.agent_runtime_state (
        agent_id uuid PRIMARY KEY REFERENCES runs.agents (id),
        last_run_id uuid,
        last_run_status text,
        last_error text,
        last_heartbeat_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE runs.supervisor_nodes (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        host text NOT NULL,
        boot_id text NOT NULL,
        pid integer NOT NULL,
        process_started_at timestamptz NOT NULL,
        max_processes integer NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        renewed_at timestamptz NOT NULL DEFAULT now(),
        lease_expires_at timestamptz NOT NULL,
        stopped_at timestamptz
    )
    """,
    "CREATE INDEX supervisor_nodes_host_idx ON runs.supervisor_nodes (host, boot_id)",
    """
    CREATE TABLE runs.consumer_cursors (
        consumer text PRIMARY KEY,
        last_event_id bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    # Dispatchers LISTEN here; a short poll covers lost notifications.
    """
    CREATE FUNCTION runs.notify_run_queued() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('paperclip_runs_queued', NEW.agent_id::text);
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER heartbeat_runs_notify_queued
        AFTER INSERT OR UPDATE OF status ON runs.heartbeat_runs
        FOR EACH ROW WHEN (NEW.status = 'queued')
        EXECUTE FUNCTION runs.notify_run_queued()
    """,
    # WatchRun listeners: a run has new events (payload: run id).
    """
    CREATE FUNCTION runs.notify_run_events() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('paperclip_run_events', NEW.run_id::text);
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER run_events_notify AFTER INSERT ON runs.run_events
        FOR EACH ROW EXECUTE FUNCTION runs.notify_run_events()
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS run_events_notify ON runs.run_events")
    op.execute("DROP TRIGGER IF EXISTS heartbeat_runs_notify_queued ON runs.heartbeat_runs")
    op.execute("DROP FUNCTION IF EXISTS runs.notify_run_events()")
    op.execute("DROP FUNCTION IF EXISTS runs.notify_run_queued()")
    for table in (
        "consumer_cursors",
        "supervisor_nodes",
        "agent_runtime_state",
        "run_events",
        "wakeup_requests",
    ):
        op.execute(f"DROP TABLE IF EXISTS runs.{table}")
