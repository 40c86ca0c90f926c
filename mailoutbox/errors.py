"""The exception tree of mailoutbox.

Callers catch by meaning, never by message text::

    MailOutboxError
    ├── InvalidMail            bad input; raised before anything is written
    ├── DeliveryNotFound       no delivery with that id
    ├── InvalidTransition      the operation does not apply to the delivery's state
    │   └── ResendOnSent       resend of a delivery that was already sent
    ├── SchemaNotMigrated      the outbox tables are missing (run mailoutbox.migrate)
    └── SendError              raised by a Transport for one delivery
        ├── TransientSendError worth retrying (SMTP 4xx, network errors, timeouts)
        │   ├── ServerUnavailable   no session at all (refused, greeting 421): pause, not a try
        │   └── UnknownSendOutcome  connection lost after DATA: the server may have the message
        └── PermanentSendError not worth retrying (SMTP 5xx, a message the server refuses)
"""

from __future__ import annotations

from collections.abc import Mapping

import psycopg
import sqlalchemy as sa


class MailOutboxError(Exception):
    """Root of every error mailoutbox raises on purpose."""


class InvalidMail(MailOutboxError, ValueError):
    """A Mail (or an outbox setting) failed validation; nothing was written.

    `field` names the offending field where there is one.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DeliveryNotFound(MailOutboxError, LookupError):
    """No delivery exists with the given id."""

    def __init__(self, delivery_id: object) -> None:
        super().__init__(f"no delivery with id {delivery_id}")
        self.delivery_id = delivery_id


class InvalidTransition(MailOutboxError):
    """The delivery's current status does not allow the operation."""

    def __init__(self, delivery_id: object, status: str, operation: str) -> None:
        super().__init__(f"cannot {operation} delivery {delivery_id}: it is {status}")
        self.delivery_id = delivery_id
        self.status = status
        self.operation = operation


class ResendOnSent(InvalidTransition):
    """resend() was asked for a delivery that has already been sent."""

    def __init__(self, delivery_id: object) -> None:
        super().__init__(delivery_id, "sent", "resend")


class SchemaNotMigrated(MailOutboxError):
    """The outbox tables do not exist in the configured schema."""


class SendError(MailOutboxError):
    """A transport failed to hand one message to the mail server.

    `code` is the SMTP reply code where the server gave one, `enhanced_code`
    the RFC 3463 status (``"5.1.1"``) when the reply carried one. `refused`,
    when given, maps every recipient of the envelope to the (code, text) it was
    refused with: the server took none of them, and the message was not sent.
    """

    def __init__(
        self,
        code: int | None,
        message: str,
        *,
        enhanced_code: str | None = None,
        refused: Mapping[str, tuple[int, str]] | None = None,
    ) -> None:
        super().__init__(f"{code} {message}" if code is not None else message)
        self.code = code
        self.message = message
        self.enhanced_code = enhanced_code
        self.refused = dict(refused) if refused else None


class TransientSendError(SendError):
    """Worth another try later: SMTP 4xx, refused/reset connections, timeouts."""


class ServerUnavailable(TransientSendError):
    """The mail server could not be reached or would not start a session.

    Nothing about the message was tried, so the worker does not charge the
    delivery an attempt: it hands the delivery back and pauses claiming, with
    a growing backoff, until the server answers again.
    """


class UnknownSendOutcome(TransientSendError):
    """The connection died after the message data went out and before the reply.

    The server may or may not have accepted the message; it is retried with the
    same Message-ID so receivers can de-duplicate.
    """


class PermanentSendError(SendError):
    """Not worth retrying: SMTP 5xx, or a message the transport cannot send."""


def driver_error(exc: BaseException) -> BaseException | None:
    """The database driver's error behind `exc`; None when `exc` is not a database error.

    SQLAlchemy carries the driver's error as `.orig`; errors of a connection used
    without SQLAlchemy (a worker's LISTEN) come from psycopg as they are.
    """
    if isinstance(exc, sa.exc.DBAPIError):
        return exc.orig or exc
    if isinstance(exc, psycopg.Error):
        return exc
    return None


def first_line(exc: BaseException) -> str:
    """The first line of what `exc` says (of the driver's error, for a wrapped one).

    For one-line error reports: a SQLAlchemy error carries the driver's as `.orig`,
    whose message is the useful part; SQL and parameters follow on later lines.
    """
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
