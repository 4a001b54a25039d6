"""Indexes for the store's two frequent reads: the unfinished jobs in order of submission (every
reconcile pass and admission, every 2 s) and a page of the newest jobs (GET /v1/jobs). Without
them both read the whole table, which only grows: every job ever run stays in it.

(status, created_at) replaces the index on status alone, its prefix.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

"""
from typing import Sequence, Union

from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])
    op.create_index("ix_jobs_created_at_id", "jobs", ["created_at", "id"])
    op.drop_index("ix_jobs_status", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.drop_index("ix_jobs_created_at_id", table_name="jobs")
    op.drop_index("ix_jobs_status_created_at", table_name="jobs")
