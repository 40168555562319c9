"""indexes for a team's newest jobs and its active jobs

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 15:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # GET /v1/jobs (newest first) read and sorted every job of the team; the submit limits counted
    # the team's active jobs by scanning all of them (bench/load.py)
    op.create_index("ix_jobs_team_id_created_at", "jobs", ["team_id", "created_at"])
    op.create_index("ix_jobs_team_id_status", "jobs", ["team_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_team_id_status", table_name="jobs")
    op.drop_index("ix_jobs_team_id_created_at", table_name="jobs")
