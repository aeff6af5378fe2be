"""policies for real mailboxes (issue 4): suspension, baseline, headers-only, UIDL trouble, repairs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 06:26:36.907743
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("suspended_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("suspended_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("baseline_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("identity_note", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("uidl_change_note", sa.Text(), nullable=True))
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("headers_only", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("header_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("repairs", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("repairs")
        batch_op.drop_column("header_hash")
        batch_op.drop_column("headers_only")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("uidl_change_note")
        batch_op.drop_column("identity_note")
        batch_op.drop_column("baseline_at")
        batch_op.drop_column("suspended_reason")
        batch_op.drop_column("suspended_at")
