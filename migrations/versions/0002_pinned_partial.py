"""Reliability: pinned jobs (kept by the retention policy) and partial artifacts (of cancelled jobs).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 18:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pinned", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("artifacts_expired_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("partial", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_column("partial")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("artifacts_expired_at")
        batch_op.drop_column("pinned")
