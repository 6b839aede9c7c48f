"""Initial node registry: AS tables (nodes, certificates, tokens, revocations, audit) and the
NMS tables (address leases, node network).

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types as of this revision (models may change later).
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _node_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["node_id"], ["nodes.id"], name=op.f(f"fk_{table}_node_id_nodes"), ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("fqdn", sa.String(length=253), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("device_info", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.CheckConstraint(
            "state IN ('pending', 'active', 'revoked')", name=op.f("ck_nodes_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
        sa.UniqueConstraint("fqdn", name=op.f("uq_nodes_fqdn")),
        sa.UniqueConstraint("name", name=op.f("uq_nodes_name")),
    )
    op.create_table(
        "certificates",
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        _ts("not_before"),
        _ts("not_after"),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("pem", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.CheckConstraint(
            "status IN ('active', 'superseded', 'revoked')", name=op.f("ck_certificates_status")
        ),
        _node_fk("certificates"),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_certificates")),
    )
    op.create_index("ix_certificates_node_id", "certificates", ["node_id"])
    op.create_table(
        "enrolment_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        _ts("expires_at"),
        _ts("used_at", nullable=True),
        _ts("created_at"),
        _node_fk("enrolment_tokens"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrolment_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enrolment_tokens_token_hash")),
    )
    op.create_index("ix_enrolment_tokens_node_id", "enrolment_tokens", ["node_id"])
    op.create_table(
        "revocations",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("serial", sa.String(length=40), nullable=True),
        sa.Column("reason", sa.String(length=200), nullable=False),
        _ts("revoked_at"),
        _node_fk("revocations"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revocations")),
        sa.UniqueConstraint("serial", name=op.f("uq_revocations_serial")),
    )
    op.create_index("ix_revocations_node_id", "revocations", ["node_id"])
    op.create_index("ix_revocations_revoked_at", "revocations", ["revoked_at"])
    op.create_table(
        "audit_events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        _ts("at"),
        sa.Column("actor", sa.String(length=253), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=253), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_table(
        "address_leases",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("ipv4", sa.String(length=15), nullable=False),
        sa.Column("ipv6", sa.String(length=39), nullable=False),
        _ts("leased_at"),
        _node_fk("address_leases"),
        sa.PrimaryKeyConstraint("node_id", name=op.f("pk_address_leases")),
        sa.UniqueConstraint("ipv4", name=op.f("uq_address_leases_ipv4")),
        sa.UniqueConstraint("ipv6", name=op.f("uq_address_leases_ipv6")),
    )
    op.create_table(
        "node_network",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("local_addresses", sa.JSON(), nullable=False),
        sa.Column("observed_ipv4", sa.String(length=64), nullable=True),
        sa.Column("observed_ipv6", sa.String(length=64), nullable=True),
        sa.Column("has_ipv4", sa.Boolean(), nullable=False),
        sa.Column("has_ipv6", sa.Boolean(), nullable=False),
        sa.Column("behind_nat", sa.Boolean(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        _ts("last_seen", nullable=True),
        sa.Column("nms_replica", sa.String(length=253), nullable=True),
        _ts("updated_at"),
        _node_fk("node_network"),
        sa.PrimaryKeyConstraint("node_id", name=op.f("pk_node_network")),
    )


def downgrade() -> None:
    for table in (
        "node_network",
        "address_leases",
        "audit_events",
        "revocations",
        "enrolment_tokens",
        "certificates",
        "nodes",
    ):
        op.drop_table(table)
