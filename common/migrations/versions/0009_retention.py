"""Retention: indexes that keep the sweeps' statements cheap, and no auth notification
for deleting a run that had already ended.

- ``heartbeat_runs_finished_idx``: finished runs in ``finished_at`` order (the run and
  run-event policies walk it);
- ``heartbeat_runs_retry_of_idx``: whether a run is retried by another
  (``retry_of_run_id`` is a foreign key without an index so far);
- ``heartbeat_runs_live_wake_idx``: the wake a live run was started for;
- ``wakeup_requests_skipped_idx`` / ``wakeup_requests_finished_idx``: ended wakes in
  ``requested_at`` order, per policy;
- ``workspace_operations_parent_idx``: whether an operation has children (a foreign
  key);
- ``environment_leases_ended_idx``: ended leases in ``released_at`` order.

``heartbeat_runs_notify_deleted`` NOTIFYs ``paperclip_auth`` only for a run deleted
while queued or running: an ended run's token was already ended by
``heartbeat_runs_notify_ended``, and a sweep deleting thousands of ended runs would
otherwise send a notification per row.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TERMINAL = "('succeeded', 'failed', 'cancelled', 'timed_out')"

STATEMENTS = [
    f"""
    CREATE INDEX IF NOT EXISTS heartbeat_runs_finished_idx
        ON runs.heartbeat_runs (finished_at, id) WHERE status IN {TERMINAL}
    """,
    """
    CREATE INDEX IF NOT EXISTS heartbeat_runs_retry_of_idx
        ON runs.heartbeat_runs (retry_of_run_id) WHERE retry_of_run_id IS NOT NULL
    """,
    """
    CREATE INDEX IF NOT EXISTS heartbeat_runs_live_wake_idx
        ON runs.heartbeat_runs (wakeup_request_id)
        WHERE status IN ('queued', 'running') AND wakeup_request_id IS NOT NULL
    """,
    """
    CREATE INDEX IF NOT EXISTS wakeup_requests_skipped_idx
        ON runs.wakeup_requests (requested_at) WHERE status IN ('skipped', 'coalesced')
    """,
    """
    CREATE INDEX IF NOT EXISTS wakeup_requests_finished_idx
        ON runs.wakeup_requests (requested_at)
        WHERE status IN ('completed', 'failed', 'cancelled')
    """,
    """
    CREATE INDEX IF NOT EXISTS workspace_operations_parent_idx
        ON workspaces.workspace_operations (parent_operation_id)
        WHERE parent_operation_id IS NOT NULL
    """,
    """
    CREATE INDEX IF NOT EXISTS environment_leases_ended_idx
        ON workspaces.environment_leases (released_at) WHERE status <> 'active'
    """,
    "DROP TRIGGER IF EXISTS heartbeat_runs_notify_deleted ON runs.heartbeat_runs",
    """
    CREATE TRIGGER heartbeat_runs_notify_deleted AFTER DELETE ON runs.heartbeat_runs
        FOR EACH ROW WHEN (OLD.status IN ('queued', 'running'))
        EXECUTE FUNCTION runs.notify_run_deleted()
    """,
]

INDEXES = [
    "runs.heartbeat_runs_finished_idx",
    "runs.heartbeat_runs_retry_of_idx",
    "runs.heartbeat_runs_live_wake_idx",
    "runs.wakeup_requests_skipped_idx",
    "runs.wakeup_requests_finished_idx",
    "workspaces.workspace_operations_parent_idx",
    "workspaces.environment_leases_ended_idx",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS heartbeat_runs_notify_deleted ON runs.heartbeat_runs")
    op.execute(
        """
        CREATE TRIGGER heartbeat_runs_notify_deleted AFTER DELETE ON runs.heartbeat_runs
            FOR EACH ROW EXECUTE FUNCTION runs.notify_run_deleted()
        """
    )
    for index in INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {index}")
