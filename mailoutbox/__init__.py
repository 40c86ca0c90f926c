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
    ServerUnavailable,
    TransientSendError,
    UnknownSendOutcome,
)
from .mail import Mail
from .migrations import downgrade, migrate
from .outbox import Outbox
from .records import Attempt, DeadLetter, Delivery, Enqueued, Page, Payload, Recipient
from .retry import RetryPolicy
from .schema import Kind, Outcome, Status
from .transports.base import Envelope, SendResult, Transport
from .transports.file import FileTransport
from .transports.memory import MemoryTransport
from .transports.null import NullTransport
from .transports.smtp import SmtpTransport
from .worker import TickReport, Worker


def __getattr__(name: str) -> object:
    # The async classes need SQLAlchemy's asyncio extra (greenlet): import them on demand.
    if name in ("AsyncOutbox", "AsyncWorker"):
        from . import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'mailoutbox' has no attribute {name!r}")


__all__ = [
    "AsyncOutbox",
    "AsyncWorker",
    "Attempt",
    "DeadLetter",
    "Delivery",
    "DeliveryNotFound",
    "Enqueued",
    "Envelope",
    "FileTransport",
    "InvalidMail",
    "InvalidTransition",
    "Kind",
    "Mail",
    "MemoryTransport",
    "NullTransport",
    "MailOutboxError",
    "Outbox",
    "Outcome",
    "Page",
    "Payload",
    "PermanentSendError",
    "Recipient",
    "ResendOnSent",
    "RetryPolicy",
    "SchemaNotMigrated",
    "SendError",
    "SendResult",
    "ServerUnavailable",
    "SmtpTransport",
    "Status",
    "TickReport",
    "Transport",
    "TransientSendError",
    "UnknownSendOutcome",
    "Worker",
    "downgrade",
    "migrate",
]
