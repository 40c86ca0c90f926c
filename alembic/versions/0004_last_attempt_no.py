"""Each delivery keeps the number of its latest attempt.

An attempt used to be numbered MAX(attempt_no) + 1 by a subquery on
mail_attempts for each row the claim or the completion recorded. That is an
index probe per attempt, and a plan risk: a prepared completion planned while
mail_attempts looked empty (right after it was analyzed empty, say after a
purge) kept a sequential scan of the history for every attempt until the table
was analyzed again (seen: a drain 6 times slower). `last_attempt_no` is set by
the same UPDATE that records the attempt, so numbering reads nothing.

The column is added without a value for existing rows, which takes no rewrite
and no long lock; only its default (0) applies to new rows. A row left NULL is
numbered from its history the first time an attempt is recorded for it, as
before, and keeps its number from then on.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import context, op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return str(context.config.attributes["schema"])


def upgrade() -> None:
    schema = _schema()
    op.add_column(
        "mail_deliveries", sa.Column("last_attempt_no", sa.Integer, nullable=True), schema=schema
    )
    op.alter_column(
        "mail_deliveries", "last_attempt_no", server_default=sa.text("0"), schema=schema
    )


def downgrade() -> None:
    op.drop_column("mail_deliveries", "last_attempt_no", schema=_schema())
