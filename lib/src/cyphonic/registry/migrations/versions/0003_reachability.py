"""Reachability (NMS): each node's NAT mapping behaviour and whether inbound traffic reaches
it, as the reachability probes found (docs/nms.md "Reachability probes").

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("node_network") as batch:
        batch.add_column(sa.Column("nat_mapping", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("inbound", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("node_network") as batch:
        batch.drop_column("inbound")
        batch.drop_column("nat_mapping")
