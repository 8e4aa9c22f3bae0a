"""Run index for the stranded-issue sweep at scale.

``heartbeat_runs_issue_agent_latest_idx``: the latest run of an (issue, agent) pair, read
once per candidate by ``ReconcileStrandedIssues`` (``ORDER BY created_at DESC, id DESC
LIMIT 1``): one index probe, where the planner otherwise combined the issue and agent
indexes with a bitmap AND and sorted (about 0.1 ms per candidate with 100,000 runs; a
pass over 5,000 candidates took ~470 ms, ~25 ms with this index).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE INDEX heartbeat_runs_issue_agent_latest_idx
            ON runs.heartbeat_runs (issue_id, agent_id, created_at DESC, id DESC)
            WHERE issue_id IS NOT NULL
        """
    )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS runs.heartbeat_runs_issue_agent_latest_idx")
