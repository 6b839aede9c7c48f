"""Access policy (NMS): the document in force and its history (docs/policy.md).

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "access_policy",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=253), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_access_policy_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_policy")),
    )
    op.create_table(
        "access_policy_history",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=253), nullable=False),
        sa.Column("old_document", sa.JSON(), nullable=True),
        sa.Column("new_document", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_policy_history")),
    )
    op.create_index("ix_access_policy_history_at", "access_policy_history", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_access_policy_history_at", table_name="access_policy_history")
    op.drop_table("access_policy_history")
    op.drop_table("access_policy")
