"""missing from the listing: since when and for how many polls a message has not been listed, and the
last listing that lacked most of the known maildrop at once

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 11:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("listing_note", sa.Text(), nullable=True))
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("missing_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("missing_polls", sa.Integer(), nullable=False, server_default="0"))
    # Partial: only the few rows missing from the last listing (see models.MessageRow).
    op.create_index(
        "ix_messages_account_missing",
        "messages",
        ["account_id"],
        unique=False,
        sqlite_where=sa.text("missing_since IS NOT NULL"),
        postgresql_where=sa.text("missing_since IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_account_missing", table_name="messages")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("missing_polls")
        batch_op.drop_column("missing_since")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("listing_note")
