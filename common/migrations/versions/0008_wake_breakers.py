"""Wake breakers: the trips of the wake-loop breaker and of agents' daily run budgets,
and the budget itself.

A trip stops further wakes of its (agent, issue, reason) — the budget's: of its agent —
until it is cleared: a loop trip by a board user's comment or change on the issue, or
any status change; a budget trip when the agent's runs of the last 24 hours fall below
its budget. ``announced_at`` is set once the issue carries the comment that explains it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

STATEMENTS = [
    """
    ALTER TABLE runs.agents
        ADD COLUMN daily_run_budget integer NOT NULL DEFAULT 0
            CHECK (daily_run_budget BETWEEN 0 AND 100000)
    """,
    """
    CREATE TABLE runs.wake_breakers (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        company_id uuid NOT NULL REFERENCES issues.companies (id),
        agent_id uuid NOT NULL REFERENCES runs.agents (id),
        issue_id uuid,
        kind text NOT NULL CHECK (kind IN ('wake_loop', 'daily_run_budget')),
        reason text NOT NULL DEFAULT '',
        runs integer NOT NULL,
        window_seconds integer NOT NULL,
        tripped_at timestamptz NOT NULL DEFAULT now(),
        announced_at timestamptz
    )
    """,
    """
    CREATE INDEX wake_breakers_agent_idx
        ON runs.wake_breakers (agent_id, kind, issue_id, reason, tripped_at DESC)
    """,
    """
    CREATE INDEX wake_breakers_unannounced_idx ON runs.wake_breakers (tripped_at)
        WHERE announced_at IS NULL AND issue_id IS NOT NULL
    """,
    """
    CREATE INDEX heartbeat_runs_agent_created_idx
        ON runs.heartbeat_runs (agent_id, created_at DESC)
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP INDEX runs.heartbeat_runs_agent_created_idx")
    op.execute("DROP TABLE runs.wake_breakers")
    op.execute("ALTER TABLE runs.agents DROP COLUMN daily_run_budget")
