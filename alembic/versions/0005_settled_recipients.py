"""Each delivery keeps the recipients an earlier attempt settled.

A server can accept a mail for some recipients and refuse others for now (a
greylisted cc, a 451 in a later transaction after a 452). Retrying the whole
mail would reach the accepted recipients twice; recording it as sent left the
others without it for good. The worker now retries the mail for the recipients
still waiting, and `settled_recipients` holds the envelope addresses it must
not send to again: accepted, or refused for good, by an earlier attempt.

NULL (nothing settled) is the common case and costs nothing. The column is
added without a value, which takes no rewrite and no long lock.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from alembic import context, op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return str(context.config.attributes["schema"])


def upgrade() -> None:
    op.add_column(
        "mail_deliveries",
        sa.Column("settled_recipients", pg.ARRAY(sa.Text), nullable=True),
        schema=_schema(),
    )


def downgrade() -> None:
    op.drop_column("mail_deliveries", "settled_recipients", schema=_schema())
