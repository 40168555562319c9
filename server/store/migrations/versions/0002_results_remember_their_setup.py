"""results remember their setup

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 04:36:46.909137
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        # rows stored before this revision ran on their preset's defaults as far as the store knows
        batch_op.add_column(
            sa.Column("setup", sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("setup")
