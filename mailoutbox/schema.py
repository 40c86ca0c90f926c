"""SQLAlchemy Core metadata for the outbox tables, and the enums stored in them.

The tables are those of the Go store this package grew out of (same names and
columns) plus the lease, scheduling and richer-mail columns DESIGN.md adds.
`tables_for(schema)` builds one `Tables` bundle per PostgreSQL schema; every
statement builder takes that bundle, so a host can run several outboxes in one
database. The alembic migrations create exactly this metadata (a test compares
them with alembic's autogenerate).
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from .errors import InvalidMail

DEFAULT_SCHEMA = "mailoutbox"
VERSION_TABLE = "mailoutbox_alembic_version"
# LISTEN/NOTIFY channel prefix; the schema name is appended so outboxes in one database stay apart.
NOTIFY_CHANNEL_PREFIX = "mailoutbox_"


class Status(str, enum.Enum):
    """Where a delivery is in its life."""

    PENDING = "pending"
    SENDING = "sending"
    RETRYING = "retrying"
    SENT = "sent"
    DEAD_LETTERED = "dead_lettered"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


# Claimable rows: waiting ones, and `sending` ones whose lease may have expired.
ACTIVE_STATUSES = (Status.PENDING, Status.RETRYING, Status.SENDING)
# Waiting to be sent; a claim takes these in batches. A `sending` row whose lease
# ran out is claimed on its own (statements.claim_due says why).
WAITING_STATUSES = (Status.PENDING, Status.RETRYING)
TERMINAL_STATUSES = (Status.SENT, Status.DEAD_LETTERED, Status.CANCELLED)


class Kind(str, enum.Enum):
    """How a recipient receives the mail; bcc recipients never appear in headers."""

    TO = "to"
    CC = "cc"
    BCC = "bcc"

    def __str__(self) -> str:
        return self.value


class Outcome(str, enum.Enum):
    """What one attempt ended in (a row of mail_attempts)."""

    SENT = "sent"
    TRANSIENT_FAILURE = "transient_failure"
    PERMANENT_FAILURE = "permanent_failure"
    # The connection was lost after DATA: the server may hold the message.
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    # A worker claimed the delivery and never completed it (it died or hung past its lease).
    LEASE_EXPIRED = "lease_expired"

    def __str__(self) -> str:
        return self.value


# 52 characters at most: the NOTIFY channel "mailoutbox_<schema>" must fit PostgreSQL's
# 63-byte identifier limit.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,51}")


def validate_schema_name(schema: str) -> str:
    """Return `schema` if it is a plain lower-case identifier, else raise InvalidMail.

    Plain identifiers need no quoting anywhere (alembic, NOTIFY channel names,
    the CLI) and cannot smuggle SQL.
    """
    if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
        raise InvalidMail(
            f"schema name must match {_SCHEMA_NAME.pattern!r}, got {schema!r}", field="schema"
        )
    return schema


def _in(column: str, values: tuple[enum.Enum, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


@dataclass(frozen=True)
class Tables:
    """The five outbox tables of one PostgreSQL schema."""

    schema: str
    metadata: sa.MetaData
    deliveries: sa.Table
    payloads: sa.Table
    recipients: sa.Table
    attempts: sa.Table
    dead_letters: sa.Table

    @property
    def notify_channel(self) -> str:
        return NOTIFY_CHANNEL_PREFIX + self.schema


def _now() -> sa.sql.elements.TextClause:
    return sa.text("now()")


def tables_for(schema: str = DEFAULT_SCHEMA) -> Tables:
    """The Table objects for `schema` (built once per schema); InvalidMail for a bad name."""
    return _tables_for(validate_schema_name(schema))


@functools.lru_cache(maxsize=32)
def _tables_for(schema: str) -> Tables:
    md = sa.MetaData(schema=schema)
    tz = sa.DateTime(timezone=True)

    payloads = sa.Table(
        "mail_payloads",
        md,
        sa.Column("payload_id", pg.UUID(as_uuid=True), primary_key=True),
        # text/plain, text/html, multipart/alternative, or message/rfc822 for Mail.from_message.
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=True),
        # text/plain and multipart/alternative: the UTF-8 text part; text/html: the HTML;
        # message/rfc822: the caller's MIME message without the headers the outbox owns.
        sa.Column("body", sa.LargeBinary, nullable=False),
        # The HTML alternative of a multipart/alternative mail.
        sa.Column("html_body", sa.Text, nullable=True),
        sa.Column("sender", sa.Text, nullable=False),
        # Extra headers (Reply-To included) as [[name, value], ...], in order.
        sa.Column("headers", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("created_at", tz, nullable=False, server_default=_now()),
    )

    deliveries = sa.Table(
        "mail_deliveries",
        md,
        sa.Column("delivery_id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("template_id", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        # Claims in the current cycle; bumped when claimed, so a delivery that kills its
        # worker every time still runs out of attempts. Reset by resend.
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        # When the delivery next needs a worker: send_at / retry time for pending and
        # retrying rows, the lease expiry for sending rows. NULL once terminal.
        sa.Column("next_attempt_at", tz, nullable=True),
        sa.Column(
            "payload_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey(payloads.c.payload_id, name="mail_deliveries_payload_id_fkey"),
            nullable=False,
        ),
        sa.Column("last_error", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("created_at", tz, nullable=False, server_default=_now()),
        sa.Column("updated_at", tz, nullable=False, server_default=_now()),
        sa.Column("sent_at", tz, nullable=True),
        sa.Column("dead_lettered_at", tz, nullable=True),
        sa.Column("expires_at", tz, nullable=True),
        # When the current cycle of attempts began: send_at (or enqueue time), reset by
        # resend. RetryPolicy.max_age counts from here, so a resent mail gets a full cycle.
        sa.Column("cycle_started_at", tz, nullable=False, server_default=_now()),
        # The lease: who holds the row, until when, and the token that fences completion.
        sa.Column("locked_by", sa.Text, nullable=True),
        sa.Column("locked_until", tz, nullable=True),
        sa.Column("claim_token", pg.UUID(as_uuid=True), nullable=True),
        # The attempt_no of the delivery's latest row in mail_attempts (0: none yet),
        # across resends: the next attempt is numbered from here, not from a search of
        # the history. NULL on rows from before migration 0004: numbered from the
        # history the first time, then kept here.
        sa.Column("last_attempt_no", sa.Integer, nullable=True, server_default=sa.text("0")),
        # Envelope addresses an earlier attempt settled (accepted by the server, or
        # refused for good) while others were refused for now (migration 0005): retries
        # go to the others only. Resend keeps it, so a resent mail reaches nobody twice.
        # NULL: none settled, the common case.
        sa.Column("settled_recipients", pg.ARRAY(sa.Text), nullable=True),
        sa.UniqueConstraint(
            "template_id", "idempotency_key", name="mail_deliveries_template_id_idempotency_key_key"
        ),
        sa.CheckConstraint(_in("status", tuple(Status)), name="mail_deliveries_status_check"),
        sa.CheckConstraint("template_id <> ''", name="mail_deliveries_template_id_check"),
        sa.CheckConstraint("idempotency_key <> ''", name="mail_deliveries_idempotency_key_check"),
        # Migration 0001 sets fillfactor 80: claimed rows are rewritten several times, and
        # room on the page keeps those updates HOT. (Not `postgresql_with` here: that
        # argument arrived in SQLAlchemy 2.1, and 2.0 refuses the whole table.)
    )
    # The claim query's indexes: only rows a worker may still need, in claim order,
    # so their size tracks the backlog and the leases, not the history of sent mail.
    # Waiting rows and leased rows apart, because a claim looks for each on its own;
    # a row is in one of them at most, so a claim or a completion updates one.
    sa.Index(
        "mail_deliveries_due_idx",
        deliveries.c.next_attempt_at,
        postgresql_where=sa.text(_in("status", WAITING_STATUSES)),
    )
    sa.Index(
        "mail_deliveries_leased_idx",
        deliveries.c.next_attempt_at,
        postgresql_where=sa.text(_in("status", (Status.SENDING,))),
    )
    sa.Index("mail_deliveries_created_at_idx", deliveries.c.created_at)
    sa.Index("mail_deliveries_payload_id_idx", deliveries.c.payload_id)

    recipients = sa.Table(
        "mail_recipients",
        md,
        sa.Column("recipient_id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "delivery_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey(
                deliveries.c.delivery_id,
                name="mail_recipients_delivery_id_fkey",
                ondelete="CASCADE",
            ),
            nullable=False,
        ),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        # Order of the recipient within the mail, so headers list them as given.
        sa.Column("position", sa.SmallInteger, nullable=False),
        sa.CheckConstraint(_in("kind", tuple(Kind)), name="mail_recipients_kind_check"),
    )
    sa.Index("mail_recipients_delivery_id_idx", recipients.c.delivery_id, recipients.c.position)

    attempts = sa.Table(
        "mail_attempts",
        md,
        sa.Column("attempt_id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "delivery_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey(
                deliveries.c.delivery_id, name="mail_attempts_delivery_id_fkey", ondelete="CASCADE"
            ),
            nullable=False,
        ),
        # Monotonic per delivery across resend cycles (MAX + 1).
        sa.Column("attempt_no", sa.Integer, nullable=False),
        sa.Column("started_at", tz, nullable=False),
        sa.Column("finished_at", tz, nullable=True),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("error_class", sa.Text, nullable=True),
        sa.Column("smtp_code", sa.Integer, nullable=True),
        sa.Column("smtp_enhanced_code", sa.Text, nullable=True),
        # Recipients the server refused while accepting others: {address: [code, text]}.
        sa.Column("refused", pg.JSONB, nullable=True),
        sa.Column("worker", sa.Text, nullable=True),
        sa.CheckConstraint(_in("outcome", tuple(Outcome)), name="mail_attempts_outcome_check"),
        sa.UniqueConstraint(
            "delivery_id", "attempt_no", name="mail_attempts_delivery_id_attempt_no_key"
        ),
    )

    dead_letters = sa.Table(
        "mail_dead_letters",
        md,
        sa.Column("dead_letter_id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "delivery_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey(
                deliveries.c.delivery_id,
                name="mail_dead_letters_delivery_id_fkey",
                ondelete="CASCADE",
            ),
            nullable=False,
        ),
        sa.Column("archived_at", tz, nullable=False, server_default=_now()),
        sa.Column("reason", sa.Text, nullable=False),
    )
    sa.Index("mail_dead_letters_archived_at_idx", dead_letters.c.archived_at)
    sa.Index("mail_dead_letters_delivery_id_idx", dead_letters.c.delivery_id)

    return Tables(schema, md, deliveries, payloads, recipients, attempts, dead_letters)
