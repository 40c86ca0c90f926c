"""The outbox tables, their indexes, and the enqueue notification.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from alembic import context, op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "('pending', 'sending', 'retrying', 'sent', 'dead_lettered', 'cancelled')"
ACTIVE = "('pending', 'retrying', 'sending')"
KINDS = "('to', 'cc', 'bcc')"
OUTCOMES = (
    "('sent', 'transient_failure', 'permanent_failure', 'unknown', 'expired', 'lease_expired')"
)


def _schema() -> str:
    return str(context.config.attributes["schema"])


def upgrade() -> None:
    schema = _schema()
    uuid = pg.UUID(as_uuid=True)
    tz = sa.DateTime(timezone=True)
    now = sa.text("now()")

    op.create_table(
        "mail_payloads",
        sa.Column("payload_id", uuid, primary_key=True),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=True),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("html_body", sa.Text, nullable=True),
        sa.Column("sender", sa.Text, nullable=False),
        sa.Column("headers", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("created_at", tz, nullable=False, server_default=now),
        schema=schema,
    )
    op.create_table(
        "mail_deliveries",
        sa.Column("delivery_id", uuid, primary_key=True),
        sa.Column("template_id", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", tz, nullable=True),
        sa.Column("payload_id", uuid, nullable=False),
        sa.Column("last_error", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("created_at", tz, nullable=False, server_default=now),
        sa.Column("updated_at", tz, nullable=False, server_default=now),
        sa.Column("sent_at", tz, nullable=True),
        sa.Column("dead_lettered_at", tz, nullable=True),
        sa.Column("expires_at", tz, nullable=True),
        sa.Column("cycle_started_at", tz, nullable=False, server_default=now),
        sa.Column("locked_by", sa.Text, nullable=True),
        sa.Column("locked_until", tz, nullable=True),
        sa.Column("claim_token", uuid, nullable=True),
        sa.ForeignKeyConstraint(
            ["payload_id"],
            [f"{schema}.mail_payloads.payload_id"],
            name="mail_deliveries_payload_id_fkey",
        ),
        sa.UniqueConstraint(
            "template_id", "idempotency_key", name="mail_deliveries_template_id_idempotency_key_key"
        ),
        sa.CheckConstraint(f"status IN {STATUSES}", name="mail_deliveries_status_check"),
        sa.CheckConstraint("template_id <> ''", name="mail_deliveries_template_id_check"),
        sa.CheckConstraint("idempotency_key <> ''", name="mail_deliveries_idempotency_key_check"),
        schema=schema,
    )
    # Claimed rows are rewritten several times; room on the page keeps those updates HOT.
    # A statement of its own, as SQLAlchemy 2.0 has no `postgresql_with` for tables.
    op.execute(f'ALTER TABLE "{schema}".mail_deliveries SET (fillfactor = 80)')
    op.create_index(
        "mail_deliveries_due_idx",
        "mail_deliveries",
        ["next_attempt_at"],
        schema=schema,
        postgresql_where=sa.text(f"status IN {ACTIVE}"),
    )
    op.create_index(
        "mail_deliveries_created_at_idx", "mail_deliveries", ["created_at"], schema=schema
    )
    op.create_index(
        "mail_deliveries_payload_id_idx", "mail_deliveries", ["payload_id"], schema=schema
    )

    op.create_table(
        "mail_recipients",
        sa.Column("recipient_id", uuid, primary_key=True),
        sa.Column("delivery_id", uuid, nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("position", sa.SmallInteger, nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            [f"{schema}.mail_deliveries.delivery_id"],
            name="mail_recipients_delivery_id_fkey",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(f"kind IN {KINDS}", name="mail_recipients_kind_check"),
        schema=schema,
    )
    op.create_index(
        "mail_recipients_delivery_id_idx",
        "mail_recipients",
        ["delivery_id", "position"],
        schema=schema,
    )

    op.create_table(
        "mail_attempts",
        sa.Column("attempt_id", uuid, primary_key=True),
        sa.Column("delivery_id", uuid, nullable=False),
        sa.Column("attempt_no", sa.Integer, nullable=False),
        sa.Column("started_at", tz, nullable=False),
        sa.Column("finished_at", tz, nullable=True),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("error_class", sa.Text, nullable=True),
        sa.Column("smtp_code", sa.Integer, nullable=True),
        sa.Column("smtp_enhanced_code", sa.Text, nullable=True),
        sa.Column("refused", pg.JSONB, nullable=True),
        sa.Column("worker", sa.Text, nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            [f"{schema}.mail_deliveries.delivery_id"],
            name="mail_attempts_delivery_id_fkey",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(f"outcome IN {OUTCOMES}", name="mail_attempts_outcome_check"),
        sa.UniqueConstraint(
            "delivery_id", "attempt_no", name="mail_attempts_delivery_id_attempt_no_key"
        ),
        schema=schema,
    )

    op.create_table(
        "mail_dead_letters",
        sa.Column("dead_letter_id", uuid, primary_key=True),
        sa.Column("delivery_id", uuid, nullable=False),
        sa.Column("archived_at", tz, nullable=False, server_default=now),
        sa.Column("reason", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            [f"{schema}.mail_deliveries.delivery_id"],
            name="mail_dead_letters_delivery_id_fkey",
            ondelete="CASCADE",
        ),
        schema=schema,
    )
    op.create_index(
        "mail_dead_letters_archived_at_idx", "mail_dead_letters", ["archived_at"], schema=schema
    )
    op.create_index(
        "mail_dead_letters_delivery_id_idx", "mail_dead_letters", ["delivery_id"], schema=schema
    )

    # Wake sleeping workers when mail is enqueued. NOTIFY is delivered at commit (never for a
    # rolled-back enqueue), and identical notifications in one transaction are folded into one,
    # so a batch enqueue costs a single wake-up. Only INSERT: claims and completions update
    # status all the time and must not wake every worker (resend notifies explicitly).
    op.execute(
        f"""
        CREATE FUNCTION "{schema}".mail_notify_due() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('mailoutbox_{schema}', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER mail_deliveries_notify_due
        AFTER INSERT ON "{schema}".mail_deliveries
        FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".mail_notify_due()
        """
    )


def downgrade() -> None:
    schema = _schema()
    op.execute(f'DROP TRIGGER IF EXISTS mail_deliveries_notify_due ON "{schema}".mail_deliveries')
    op.execute(f'DROP FUNCTION IF EXISTS "{schema}".mail_notify_due()')
    op.drop_table("mail_dead_letters", schema=schema)
    op.drop_table("mail_attempts", schema=schema)
    op.drop_table("mail_recipients", schema=schema)
    op.drop_table("mail_deliveries", schema=schema)
    op.drop_table("mail_payloads", schema=schema)
