"""One active run per (agent, issue), enforced on every database.

The partial unique index ``heartbeat_runs_one_active_per_agent_issue`` (queued or
running runs, per agent and issue) is what every path creating a run relies on. A
database made before the index existed may hold duplicates; this revision settles them
first, then makes sure the index is there:

- per (agent, issue), the run that stays is the running one (the oldest if several),
  else the oldest queued one;
- every other active run of the pair ends ``cancelled`` with error code
  ``duplicate_active_run`` (and a lifecycle event saying which run stayed);
- the wakes those runs were queued for become ``coalesced`` into the run that stayed,
  as a wake arriving while it was active would have: no wake is lost.

Issue locks a cancelled duplicate held are cleared by the issue service's stale-lock
sweep, as for any finished run.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

DUPLICATE_ERROR_CODE = "duplicate_active_run"

STATEMENTS = [
    f"""
    WITH ranked AS (
        SELECT id,
               first_value(id) OVER pair AS keeper,
               row_number() OVER pair AS rank
        FROM runs.heartbeat_runs
        WHERE status IN ('queued', 'running') AND issue_id IS NOT NULL
        WINDOW pair AS (
            PARTITION BY agent_id, issue_id
            ORDER BY (status = 'running') DESC, created_at, id
        )
    ),
    cancelled AS (
        UPDATE runs.heartbeat_runs r
        SET status = 'cancelled', error_code = '{DUPLICATE_ERROR_CODE}',
            error = 'another active run of the agent on this issue stayed: ' || d.keeper,
            finished_at = now(), updated_at = now(), next_event_seq = r.next_event_seq + 1
        FROM ranked d
        WHERE r.id = d.id AND d.rank > 1
        RETURNING r.id, d.keeper, r.next_event_seq - 1 AS seq
    ),
    events AS (
        INSERT INTO runs.run_events (run_id, seq, type, message, payload)
        SELECT c.id, c.seq, 'lifecycle', 'run cancelled',
               jsonb_build_object('reason', '{DUPLICATE_ERROR_CODE}', 'keptRunId', c.keeper)
        FROM cancelled c
    )
    UPDATE runs.wakeup_requests w
    SET status = 'coalesced', run_id = c.keeper, finished_at = COALESCE(w.finished_at, now())
    FROM cancelled c
    WHERE w.run_id = c.id AND w.status IN ('queued', 'claimed')
    """,
    """
    CREATE UNIQUE INDEX IF NOT EXISTS heartbeat_runs_one_active_per_agent_issue
        ON runs.heartbeat_runs (agent_id, issue_id)
        WHERE status IN ('queued', 'running') AND issue_id IS NOT NULL
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    """Nothing to undo: the index belongs to the first revision, and cancelled
    duplicates stay cancelled."""
