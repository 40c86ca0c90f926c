"""The public facade: enqueue mail in the caller's transaction, inspect and repair."""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import sqlalchemy as sa

from . import operations as ops
from .errors import DeliveryNotFound, SchemaNotMigrated
from .mail import DEFAULT_MAX_PAYLOAD_BYTES, Mail, PreparedMail, normalize_address, prepare
from .records import Attempt, DeadLetter, Delivery, Enqueued, Page, Payload, Recipient
from .schema import DEFAULT_SCHEMA, Status
from .store import Store, run

T = TypeVar("T")
MAX_PAGE = 1000
# SQLSTATEs meaning "the outbox tables/schema are not there".
_UNDEFINED_TABLE, _INVALID_SCHEMA = "42P01", "3F000"


def as_delivery_id(value: uuid.UUID | str) -> uuid.UUID:
    """A UUID from a UUID or its text; text that is no UUID names no delivery."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise DeliveryNotFound(value) from None


def connection_of(connection: Any) -> sa.Connection:
    """The Connection behind a Connection or an ORM Session (joining its transaction)."""
    if isinstance(connection, sa.Connection):
        return connection
    get = getattr(connection, "connection", None)
    if callable(get):
        conn = get()
        if isinstance(conn, sa.Connection):
            return conn
    raise TypeError(f"expected a sqlalchemy Connection or Session, got {type(connection).__name__}")


def _check_page(offset: int, limit: int) -> None:
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
    if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}, got {limit!r}")


@contextlib.contextmanager
def translate_missing_schema(schema: str) -> Iterator[None]:
    """Turn 'relation does not exist' into SchemaNotMigrated, which says what to do."""
    try:
        yield
    except sa.exc.ProgrammingError as exc:
        code = getattr(exc.orig, "sqlstate", None)
        if code in (_UNDEFINED_TABLE, _INVALID_SCHEMA):
            raise SchemaNotMigrated(
                f"the mailoutbox tables are missing in schema {schema!r}: "
                "run `mailoutbox migrate` or mailoutbox.migrate(engine)"
            ) from exc
        raise


def _translated(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: Outbox, *args: Any, **kwargs: Any) -> T:
        with translate_missing_schema(self.schema):
            return method(self, *args, **kwargs)

    return wrapper


class Outbox:
    """Enqueue mail transactionally and administer the outbox.

    `engine` is a SQLAlchemy Engine on PostgreSQL (psycopg 3). `schema` names the
    PostgreSQL schema holding the tables (see `mailoutbox.migrate`).
    `default_sender` is used for mails without a sender. Mails whose stored
    parts exceed `max_payload_bytes` are refused with InvalidMail.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        schema: str = DEFAULT_SCHEMA,
        default_sender: str | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.engine = engine
        self.store = Store(schema)
        self.tables = self.store.tables
        self.schema = self.tables.schema
        self.default_sender = (
            None if default_sender is None else normalize_address(default_sender, "default_sender")
        )
        if max_payload_bytes <= 0:
            raise ValueError("max_payload_bytes must be positive")
        self.max_payload_bytes = max_payload_bytes

    # enqueue

    def prepare(self, mail: Mail) -> PreparedMail:
        """Validate `mail` with this outbox's settings (raises InvalidMail)."""
        return prepare(
            mail, default_sender=self.default_sender, max_payload_bytes=self.max_payload_bytes
        )

    def enqueue(self, mail: Mail, *, connection: Any = None) -> Enqueued:
        """Enqueue one mail; see enqueue_many for the transaction rules."""
        return self.enqueue_many([mail], connection=connection)[0]

    @_translated
    def enqueue_many(self, mails: Sequence[Mail], *, connection: Any = None) -> list[Enqueued]:
        """Enqueue mails in one statement; return one Enqueued per mail, in input order.

        With `connection` (a Connection, or an ORM Session) the rows are written
        in the caller's transaction and nothing is committed: if the caller
        rolls back, no mail exists; once it commits, workers may send. Without
        it the outbox commits its own transaction. Every mail is validated
        first: one invalid mail raises InvalidMail and nothing is written. A
        mail whose (template_id, idempotency_key) exists already, or repeats an
        earlier one in `mails`, yields the existing delivery id with
        created=False; duplicates never raise and leave the caller's
        transaction usable.
        """
        prepared = [self.prepare(mail) for mail in mails]
        if not prepared:
            return []
        if connection is not None:
            results = self.store.insert_enqueue(connection_of(connection), prepared)
        else:
            with self.engine.begin() as conn:
                results = self.store.insert_enqueue(conn, prepared)
        return [Enqueued(delivery_id, created) for delivery_id, created in results]

    # reads

    @_translated
    def get_delivery(self, delivery_id: uuid.UUID | str) -> Delivery:
        """The delivery with that id (raises DeliveryNotFound)."""
        with self.engine.connect() as conn:
            return run(conn, ops.require_delivery(self.tables, as_delivery_id(delivery_id)))

    @_translated
    def list_deliveries(
        self,
        offset: int = 0,
        limit: int = 50,
        status: Status | str | None = None,
        *,
        template_id: str | None = None,
    ) -> Page[Delivery]:
        """A page of deliveries, newest first, optionally of one status/template."""
        _check_page(offset, limit)
        status = None if status is None else Status(status)
        with self.engine.connect() as conn:
            items, total = self.store.list_deliveries(
                conn, offset=offset, limit=limit, status=status, template_id=template_id
            )
        return Page(items, total, offset, limit)

    @_translated
    def list_recipients(self, delivery_id: uuid.UUID | str) -> list[Recipient]:
        """The delivery's recipients in order (raises DeliveryNotFound)."""
        delivery = self.get_delivery(delivery_id)
        with self.engine.connect() as conn:
            return self.store.list_recipients(conn, delivery.delivery_id)

    @_translated
    def get_payload(self, delivery_id: uuid.UUID | str) -> Payload:
        """The stored parts of the delivery's mail (raises DeliveryNotFound)."""
        delivery_id = as_delivery_id(delivery_id)
        with self.engine.connect() as conn:
            payload = self.store.get_payload(conn, delivery_id)
        if payload is None:
            raise DeliveryNotFound(delivery_id)
        return payload

    @_translated
    def list_attempts(self, delivery_id: uuid.UUID | str) -> list[Attempt]:
        """Every attempt of the delivery, by attempt_no (raises DeliveryNotFound)."""
        delivery_id = as_delivery_id(delivery_id)
        with self.engine.connect() as conn:
            run(conn, ops.require_delivery(self.tables, delivery_id))
            return self.store.list_attempts(conn, delivery_id)

    @_translated
    def list_dead_letters(self, offset: int = 0, limit: int = 50) -> Page[DeadLetter]:
        """A page of dead letters, newest first.

        A delivery that was dead-lettered, resent and dead-lettered again has
        one row per time: the list is an archive, not the current state.
        """
        _check_page(offset, limit)
        with self.engine.connect() as conn:
            items, total = self.store.list_dead_letters(conn, offset=offset, limit=limit)
        return Page(items, total, offset, limit)

    @_translated
    def count_by_status(self) -> dict[Status, int]:
        """Number of deliveries in each state; every state is present, zeros included."""
        with self.engine.connect() as conn:
            return self.store.count_by_status(conn)

    @_translated
    def queue_health(self) -> tuple[float, int]:
        """(seconds the oldest due delivery has waited, leases in flight)."""
        with self.engine.connect() as conn:
            return self.store.queue_health(conn)

    # repair

    @_translated
    def resend(self, delivery_id: uuid.UUID | str) -> Delivery:
        """Re-arm a delivery for a fresh cycle of attempts, due now.

        Applies to every state but `sent` (ResendOnSent) and `sending`
        (InvalidTransition: a worker holds it; try again once it completes).
        attempts resets to 0 and expires_at is cleared; the attempt history is
        kept and its numbering continues. Raises DeliveryNotFound.
        """
        with self.engine.begin() as conn:
            return self.store.resend(conn, as_delivery_id(delivery_id))

    @_translated
    def cancel(self, delivery_id: uuid.UUID | str) -> Delivery:
        """Cancel a pending or retrying delivery; it will not be sent.

        Raises DeliveryNotFound, or InvalidTransition for a delivery in flight
        or already finished. A cancelled delivery can be resent.
        """
        with self.engine.begin() as conn:
            return self.store.cancel(conn, as_delivery_id(delivery_id))

    @_translated
    def purge(self, older_than: timedelta = timedelta(days=30), *, batch_size: int = 1000) -> int:
        """Delete finished deliveries (sent, dead-lettered, cancelled) older than `older_than`.

        Age counts from the delivery's last change. Payloads, recipients,
        attempts and dead letters go with them. Works in batches of
        `batch_size`, each its own short transaction, so it never holds many
        locks or a long transaction; returns how many deliveries were deleted.
        """
        if older_than < timedelta(0):
            raise ValueError("older_than must not be negative")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        total = 0
        while True:
            with self.engine.begin() as conn:
                deleted = self.store.purge_batch(
                    conn, older_than_seconds=older_than.total_seconds(), batch=batch_size
                )
            total += deleted
            if deleted < batch_size:
                return total
