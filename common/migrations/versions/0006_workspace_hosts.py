"""Workspace hosts: each workspace-service replica registers the host it serves and the
address other replicas reach it at, under a lease; a workspace records the host its
directory and runtime services live on (NULL for workspaces made before hosts were
recorded: any replica serves them).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

STATEMENTS = [
    """
    CREATE TABLE workspaces.workspace_hosts (
        host text PRIMARY KEY,
        address text NOT NULL,
        instance_id uuid NOT NULL,
        pid integer NOT NULL,
        lease_expires_at timestamptz NOT NULL,
        registered_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    "ALTER TABLE workspaces.execution_workspaces ADD COLUMN host text",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("ALTER TABLE workspaces.execution_workspaces DROP COLUMN host")
    op.execute("DROP TABLE workspaces.workspace_hosts")
