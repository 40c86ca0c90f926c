"""Waiting rows and leased rows get partial indexes of their own.

A claim now takes a `sending` row whose lease ran out on its own, one at a time,
and waiting rows (pending, retrying) in batches (statements.claim_due): the
worker that held the lease may have been killed by one of those rows, and a
batch of them would charge every innocent row of it an attempt each time that
one kills another worker. Each kind is found by a range scan of its own index,
so `mail_deliveries_due_idx` now holds waiting rows only and
`mail_deliveries_leased_idx` the leased ones. A row is in one of the two at
most, so claims and completions write no more index entries than before.

Both indexes are built without CONCURRENTLY (alembic runs a migration in a
transaction): each build reads the deliveries table once while holding off
writes to it, which on a history of millions of rows takes seconds.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import context, op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return str(context.config.attributes["schema"])


def _due_index(schema: str, statuses: str) -> None:
    op.drop_index("mail_deliveries_due_idx", "mail_deliveries", schema=schema)
    op.create_index(
        "mail_deliveries_due_idx",
        "mail_deliveries",
        ["next_attempt_at"],
        schema=schema,
        postgresql_where=sa.text(f"status IN {statuses}"),
    )


def upgrade() -> None:
    schema = _schema()
    _due_index(schema, "('pending', 'retrying')")
    op.create_index(
        "mail_deliveries_leased_idx",
        "mail_deliveries",
        ["next_attempt_at"],
        schema=schema,
        postgresql_where=sa.text("status IN ('sending')"),
    )


def downgrade() -> None:
    schema = _schema()
    op.drop_index("mail_deliveries_leased_idx", "mail_deliveries", schema=schema)
    _due_index(schema, "('pending', 'retrying', 'sending')")
