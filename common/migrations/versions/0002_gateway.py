"""Gateway: users, company memberships, board API keys; notifications that end cached
authentications (a run that finished, a key that was revoked).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STATEMENTS = [
    """
    CREATE TABLE gateway.users (
        id text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 200),
        is_instance_admin boolean NOT NULL DEFAULT false,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE gateway.company_memberships (
        user_id text NOT NULL REFERENCES gateway.users (id),
        company_id uuid NOT NULL REFERENCES issues.companies (id),
        role text NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
        status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (user_id, company_id)
    )
    """,
    """
    CREATE TABLE gateway.api_keys (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        user_id text NOT NULL REFERENCES gateway.users (id),
        name text NOT NULL DEFAULT '',
        key_hash bytea NOT NULL UNIQUE,
        created_at timestamptz NOT NULL DEFAULT now(),
        revoked_at timestamptz
    )
    """,
    "CREATE INDEX api_keys_user_idx ON gateway.api_keys (user_id)",
    # Cached authentications end at once: a finished run's token, a revoked key, a
    # changed membership. Listeners also expire entries after a few seconds.
    """
    CREATE FUNCTION runs.notify_run_ended() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.status IN ('succeeded', 'failed', 'cancelled', 'timed_out')
           AND OLD.status IS DISTINCT FROM NEW.status THEN
            PERFORM pg_notify('paperclip_auth', 'run:' || NEW.id::text);
        END IF;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER heartbeat_runs_notify_ended AFTER UPDATE OF status ON runs.heartbeat_runs
        FOR EACH ROW EXECUTE FUNCTION runs.notify_run_ended()
    """,
    """
    CREATE FUNCTION runs.notify_run_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('paperclip_auth', 'run:' || OLD.id::text);
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER heartbeat_runs_notify_deleted AFTER DELETE ON runs.heartbeat_runs
        FOR EACH ROW EXECUTE FUNCTION runs.notify_run_deleted()
    """,
    """
    CREATE FUNCTION gateway.notify_auth_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('paperclip_auth', 'user:' || COALESCE(NEW.user_id, OLD.user_id));
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER api_keys_notify AFTER UPDATE OR DELETE ON gateway.api_keys
        FOR EACH ROW EXECUTE FUNCTION gateway.notify_auth_changed()
    """,
    """
    CREATE TRIGGER memberships_notify AFTER INSERT OR UPDATE OR DELETE
        ON gateway.company_memberships
        FOR EACH ROW EXECUTE FUNCTION gateway.notify_auth_changed()
    """,
    """
    CREATE FUNCTION gateway.notify_user_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('paperclip_auth', 'user:' || NEW.id);
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER users_notify AFTER UPDATE ON gateway.users
        FOR EACH ROW EXECUTE FUNCTION gateway.notify_user_changed()
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS heartbeat_runs_notify_ended ON runs.heartbeat_runs")
    op.execute("DROP TRIGGER IF EXISTS heartbeat_runs_notify_deleted ON runs.heartbeat_runs")
    op.execute("DROP FUNCTION IF EXISTS runs.notify_run_ended()")
    op.execute("DROP FUNCTION IF EXISTS runs.notify_run_deleted()")
    for table in ("api_keys", "company_memberships", "users"):
        op.execute(f"DROP TABLE IF EXISTS gateway.{table} CASCADE")
    op.execute("DROP FUNCTION IF EXISTS gateway.notify_auth_changed()")
    op.execute("DROP FUNCTION IF EXISTS gateway.notify_user_changed()")
