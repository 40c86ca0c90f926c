"""mailoutbox: a PostgreSQL-backed transactional mail outbox.

Enqueue e-mail in the same transaction as the business write that caused it;
workers send it after commit, retry transient failures with backoff, and
dead-letter what cannot be delivered. See README.md.
"""

from __future__ import annotations

from .errors import (
    DeliveryNotFound,
    InvalidMail,
    InvalidTransition,
    MailOutboxError,
    PermanentSendError,
    ResendOnSent,
    SchemaNotMigrated,
    SendError,
    TransientSendError,
    UnknownSendOutcome,
)
from .mail import Mail
from .migrations import downgrade, migrate
from .outbox import Outbox
from .records import Attempt, DeadLetter, Delivery, Enqueued, Page, Payload, Recipient
from .schema import Kind, Outcome, Status
from .transports.base import Envelope, SendResult, Transport

__all__ = [
    "Attempt",
    "DeadLetter",
    "Delivery",
    "DeliveryNotFound",
    "Enqueued",
    "Envelope",
    "InvalidMail",
    "InvalidTransition",
    "Kind",
    "Mail",
    "MailOutboxError",
    "Outbox",
    "Outcome",
    "Page",
    "Payload",
    "PermanentSendError",
    "Recipient",
    "ResendOnSent",
    "SchemaNotMigrated",
    "SendError",
    "SendResult",
    "Status",
    "Transport",
    "TransientSendError",
    "UnknownSendOutcome",
    "downgrade",
    "migrate",
]
