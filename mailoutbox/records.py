"""Plain, immutable records returned by the outbox and consumed by the worker."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from .schema import Kind, Outcome, Status

T = TypeVar("T")


@dataclass(frozen=True)
class Enqueued:
    """Result of one enqueue: the delivery id, and whether this call created it.

    `created=False` means a delivery with the same (template_id, idempotency_key)
    already existed; its id is returned and nothing new was written.
    """

    delivery_id: uuid.UUID
    created: bool


@dataclass(frozen=True)
class Delivery:
    """A row of mail_deliveries."""

    delivery_id: uuid.UUID
    template_id: str
    idempotency_key: str
    status: Status
    attempts: int
    next_attempt_at: datetime | None
    payload_id: uuid.UUID
    last_error: str
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    dead_lettered_at: datetime | None
    expires_at: datetime | None
    locked_by: str | None
    locked_until: datetime | None
    # Envelope addresses an earlier attempt settled (accepted, or refused for good)
    # while others were refused for now: retries and resends go to the others only.
    settled_recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipient:
    """One envelope recipient of a delivery."""

    address: str
    kind: Kind


@dataclass(frozen=True)
class Attempt:
    """A row of mail_attempts: one try at sending (or a lease that ran out)."""

    attempt_id: uuid.UUID
    delivery_id: uuid.UUID
    attempt_no: int
    started_at: datetime
    finished_at: datetime | None
    outcome: Outcome
    error: str
    error_class: str | None
    smtp_code: int | None
    smtp_enhanced_code: str | None
    refused: dict[str, Any] | None
    worker: str | None


@dataclass(frozen=True)
class DeadLetter:
    """A row of mail_dead_letters: a delivery that was given up on, and why."""

    dead_letter_id: uuid.UUID
    delivery_id: uuid.UUID
    archived_at: datetime
    reason: str


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing and the total number of rows the listing has."""

    items: list[T]
    total: int
    offset: int
    limit: int


@dataclass(frozen=True)
class Payload:
    """The stored parts of a mail, rendered to RFC 5322 at send time (see render.py)."""

    content_type: str
    subject: str | None
    body: bytes
    html_body: str | None
    sender: str
    headers: Sequence[tuple[str, str]]


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery leased to one worker, with everything needed to send it.

    `claimed_at` is the database's clock at the claim; `previous_status` tells a
    fresh claim (pending/retrying) from the take-over of an expired lease (sending).
    """

    delivery_id: uuid.UUID
    template_id: str
    idempotency_key: str
    attempts: int
    created_at: datetime
    cycle_started_at: datetime
    expires_at: datetime | None
    claim_token: uuid.UUID
    claimed_at: datetime
    locked_until: datetime
    previous_status: Status
    payload: Payload
    recipients: tuple[Recipient, ...] = field(default_factory=tuple)
    # Envelope addresses not to send to again (Delivery.settled_recipients).
    settled_recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class AttemptRecord:
    """What the worker learned from one send, written as a mail_attempts row."""

    outcome: Outcome
    duration_seconds: float = 0.0
    error: str = ""
    error_class: str | None = None
    smtp_code: int | None = None
    smtp_enhanced_code: str | None = None
    refused: dict[str, Any] | None = None


@dataclass(frozen=True)
class Completion:
    """How the worker ends its lease on one claimed delivery.

    `status` is SENT, RETRYING (after `retry_delay_seconds`, counted on the
    database clock) or DEAD_LETTERED (`reason` goes to mail_dead_letters).
    `attempt`, when given, is appended to mail_attempts. The completion only
    takes effect while `claim_token` still holds the lease.
    """

    delivery_id: uuid.UUID
    claim_token: uuid.UUID
    status: Status
    attempt: AttemptRecord | None = None
    retry_delay_seconds: float = 0.0
    reason: str = ""
    worker: str | None = None
    # The attempt counted at claim is given back: the send never began (server unavailable).
    refund_attempt: bool = False
    # Envelope addresses this attempt settled, for a mail retried for its other recipients.
    settled_recipients: tuple[str, ...] = ()
