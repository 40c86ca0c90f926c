"""The enqueue trigger stays quiet in a transaction that will notify after its commit.

The outbox's own enqueues, when several run at once in one process, set
`mailoutbox.notify_after_commit` for their transaction and are announced by one
NOTIFY sent after they commit (mailoutbox/notify.py): a transaction that has
called NOTIFY holds PostgreSQL's notification-queue lock through its commit, so
enqueues that each notify commit one at a time instead of sharing WAL flushes.
Every other insert (a host's transaction, a lone enqueue) notifies as before.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import context, op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    return str(context.config.attributes["schema"])


def _notify_function(schema: str, body: str) -> str:
    return f"""
        CREATE OR REPLACE FUNCTION "{schema}".mail_notify_due() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            {body}
            RETURN NULL;
        END
        $$
        """


def upgrade() -> None:
    schema = _schema()
    op.execute(
        _notify_function(
            schema,
            f"""IF current_setting('mailoutbox.notify_after_commit', true) IS DISTINCT FROM 'on'
            THEN
                PERFORM pg_notify('mailoutbox_{schema}', '');
            END IF;""",
        )
    )


def downgrade() -> None:
    schema = _schema()
    op.execute(_notify_function(schema, f"PERFORM pg_notify('mailoutbox_{schema}', '');"))
