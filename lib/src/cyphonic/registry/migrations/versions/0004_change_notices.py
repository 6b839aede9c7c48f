"""Change notices (Postgres): ``pg_notify('cyphonic_registry', <table>)`` when the access
policy (or a node's tags, which move its revision) or the revocations change, so that NMS
replicas react at once instead of polling fast (``cyphonic_nms.registry_events``). A statement
trigger covers every writer; the notice goes out when the transaction commits. Nothing on
SQLite (one host, no NOTIFY).

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TRIGGERS = {"access_policy": "INSERT OR UPDATE", "revocations": "INSERT"}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE OR REPLACE FUNCTION cyphonic_notify_change() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('cyphonic_registry', TG_TABLE_NAME);
            RETURN NULL;
        END
        $$ LANGUAGE plpgsql
        """
    )
    for table, events in TRIGGERS.items():
        op.execute(
            f"CREATE TRIGGER {table}_notify AFTER {events} ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION cyphonic_notify_change()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_notify ON {table}")
    op.execute("DROP FUNCTION IF EXISTS cyphonic_notify_change()")
