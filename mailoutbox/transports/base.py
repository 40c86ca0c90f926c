"""The Transport protocol and the values that cross it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Envelope:
    """One message ready to go: SMTP envelope plus RFC 5322 bytes.

    `recipients` are bare addresses (to, cc and bcc alike); bcc never appears in
    `message`. `message_id` is the Message-ID header's value (with the angle
    brackets), the same on every retry of the delivery.
    """

    delivery_id: uuid.UUID
    sender: str
    recipients: tuple[str, ...]
    message: bytes
    message_id: str


@dataclass(frozen=True)
class SendResult:
    """What a transport reports on success.

    `refused` maps the recipients the server refused, while it accepted the
    others, to (SMTP code, server text). A transport whose server refuses all
    recipients raises instead.
    """

    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


@runtime_checkable
class Transport(Protocol):
    """Sends one message. The worker calls `send` from up to `concurrency` threads at
    once, so an implementation must be thread-safe (SmtpTransport keeps one SMTP
    connection per thread and reuses it across messages).

    Return None or a SendResult on success; raise TransientSendError (retry later),
    UnknownSendOutcome (connection lost after DATA) or PermanentSendError (give up).
    Any other exception is treated as a permanent failure of that delivery.
    """

    def send(self, envelope: Envelope) -> SendResult | None: ...


def close_transport(transport: object) -> None:
    """Call the transport's optional `close()`, which releases its connections."""
    close = getattr(transport, "close", None)
    if callable(close):
        close()
