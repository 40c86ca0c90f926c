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
from .direct import direct
from .errors import DeliveryNotFound, SchemaNotMigrated, first_line
from .mail import DEFAULT_MAX_PAYLOAD_BYTES, Mail, PreparedMail, normalize_address, prepare
from .notify import AfterCommitNotifier
from .records import Attempt, DeadLetter, Delivery, Enqueued, Page, Payload, Recipient
from .schema import DEFAULT_SCHEMA, Status, Tables, tables_for
from .store import Store, run

T = TypeVar("T")
MAX_PAGE = 1000
# SQLSTATEs meaning "the outbox tables/schema are not there".
_UNDEFINED_TABLE, _INVALID_SCHEMA, _UNDEFINED_COLUMN = "42P01", "3F000", "42703"


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


# PostgreSQL's OFFSET is a bigint; beyond it the database, not us, would refuse.
MAX_OFFSET = 2**63 - 1
MAX_PURGE_BATCH = 100_000
# Older than anything the outbox can hold; a longer interval overflows the database's
# timestamp arithmetic.
MAX_PURGE_AGE = timedelta(days=100 * 365)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_page(offset: int, limit: int) -> None:
    if not _is_int(offset) or not 0 <= offset <= MAX_OFFSET:
        raise ValueError(f"offset must be an integer from 0 to {MAX_OFFSET}, got {offset!r}")
    if not _is_int(limit) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}, got {limit!r}")


def check_purge(older_than: timedelta, batch_size: int) -> None:
    if not isinstance(older_than, timedelta):
        raise TypeError(f"older_than must be a timedelta, got {type(older_than).__name__}")
    if not timedelta(0) <= older_than <= MAX_PURGE_AGE:
        raise ValueError(f"older_than must be from 0 to {MAX_PURGE_AGE.days} days")
    if not _is_int(batch_size) or not 1 <= batch_size <= MAX_PURGE_BATCH:
        raise ValueError(f"batch_size must be between 1 and {MAX_PURGE_BATCH}, got {batch_size!r}")


@contextlib.contextmanager
def translate_missing_schema(schema: str) -> Iterator[None]:
    """Turn 'relation does not exist' into SchemaNotMigrated, which says what to do;
    also 'column does not exist': the tables are a migration behind this release
    (application code deployed before `mailoutbox migrate` ran)."""
    try:
        yield
    except sa.exc.ProgrammingError as exc:
        code = getattr(exc.orig, "sqlstate", None)
        if code in (_UNDEFINED_TABLE, _INVALID_SCHEMA):
            raise SchemaNotMigrated(
                f"the mailoutbox tables are missing in schema {schema!r}: "
                "run `mailoutbox migrate` or mailoutbox.migrate(engine)"
            ) from exc
        if code == _UNDEFINED_COLUMN:
            raise SchemaNotMigrated(
                f"the mailoutbox tables in schema {schema!r} are behind this release "
                f"({first_line(exc)}): run `mailoutbox migrate` or mailoutbox.migrate(engine)"
            ) from exc
        raise


def _translated(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: Outbox, *args: Any, **kwargs: Any) -> T:
        with translate_missing_schema(self.schema):
            return method(self, *args, **kwargs)

    return wrapper


def require_psycopg(engine: sa.Engine | Any) -> None:
    """Raise TypeError unless `engine` is PostgreSQL through psycopg 3, which every
    statement is written for; another driver failed later, some with an error that
    named nothing (asyncpg: "'NoneType' object has no attribute 'format'")."""
    dialect = engine.dialect
    if (dialect.name, dialect.driver) != ("postgresql", "psycopg"):
        raise TypeError(
            "mailoutbox needs PostgreSQL through the psycopg (3) driver"
            f" (postgresql+psycopg://), not {dialect.name}+{dialect.driver}"
        )


class OutboxSettings:
    """What Outbox and AsyncOutbox share: the schema, the sender, the size limit."""

    def __init__(
        self,
        *,
        schema: str = DEFAULT_SCHEMA,
        default_sender: str | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.tables: Tables = tables_for(schema)
        self.schema = self.tables.schema
        self.default_sender = (
            None if default_sender is None else normalize_address(default_sender, "default_sender")
        )
        if max_payload_bytes <= 0:
            raise ValueError("max_payload_bytes must be positive")
        self.max_payload_bytes = max_payload_bytes

    def prepare(self, mail: Mail) -> PreparedMail:
        """Validate `mail` with this outbox's settings (raises InvalidMail)."""
        return prepare(
            mail, default_sender=self.default_sender, max_payload_bytes=self.max_payload_bytes
        )


class Outbox(OutboxSettings):
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
        require_psycopg(engine)
        super().__init__(
            schema=schema, default_sender=default_sender, max_payload_bytes=max_payload_bytes
        )
        self.engine = engine
        self.store = Store(self.tables)
        self._notifier = AfterCommitNotifier(lambda: self._autocommit(ops.notify_due(self.tables)))

    def _read(self, plan: ops.Plan[T]) -> T:
        with self.engine.connect() as conn:
            return run(conn, plan)

    def _write(self, plan: ops.Plan[T]) -> T:
        with self.engine.begin() as conn:
            return run(conn, plan)

    def _autocommit(self, plan: ops.Plan[T]) -> T:
        # For a plan whose writes are one statement: atomic on its own, and without
        # BEGIN and COMMIT it costs one round trip instead of three. The transaction
        # is the outbox's own, so it runs on the driver directly (see direct.py).
        with direct(self.engine, autocommit=True) as conn:
            return conn.run(plan)

    # enqueue

    @_translated
    def enqueue(self, mail: Mail, *, connection: Any = None) -> Enqueued:
        """Enqueue one mail; see enqueue_many for the transaction rules."""
        prepared = self.prepare(mail)
        delivery_id, created = self._enqueue(
            lambda after_commit: ops.insert_enqueue_one(
                self.tables, prepared, notify_after_commit=after_commit
            ),
            connection,
            lambda answer: answer[1],
        )
        return Enqueued(delivery_id, created)

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
        results = self._enqueue(
            lambda after_commit: ops.insert_enqueue(
                self.tables, prepared, notify_after_commit=after_commit
            ),
            connection,
            lambda answer: any(created for _, created in answer),
        )
        return [Enqueued(delivery_id, created) for delivery_id, created in results]

    def _enqueue(
        self,
        plan: Callable[[bool], ops.Plan[T]],
        connection: Any,
        created: Callable[[T], bool],
    ) -> T:
        """Run an enqueue plan in the caller's transaction, or in the outbox's own.

        `plan(notify_after_commit)` builds it. In the outbox's own transaction,
        while another enqueue is in flight here, workers are woken after the
        commit by one NOTIFY for many (notify.py).
        """
        if connection is not None:
            return run(connection_of(connection), plan(False))
        with self._notifier.enqueuing() as notify_after_commit:
            # The enqueue plans write in a single statement; the duplicate lookup only reads.
            answer = self._autocommit(plan(notify_after_commit))
        if notify_after_commit and created(answer):
            self._notifier.wake()
        return answer

    # reads

    @_translated
    def get_delivery(self, delivery_id: uuid.UUID | str) -> Delivery:
        """The delivery with that id (raises DeliveryNotFound)."""
        return self._read(ops.require_delivery(self.tables, as_delivery_id(delivery_id)))

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
        check_page(offset, limit)
        items, total = self._read(
            ops.list_deliveries(
                self.tables,
                offset=offset,
                limit=limit,
                status=None if status is None else Status(status),
                template_id=template_id,
            )
        )
        return Page(items, total, offset, limit)

    @_translated
    def list_recipients(self, delivery_id: uuid.UUID | str) -> list[Recipient]:
        """The delivery's recipients in order (raises DeliveryNotFound)."""
        return self._read(ops.recipients_of(self.tables, as_delivery_id(delivery_id)))

    @_translated
    def get_payload(self, delivery_id: uuid.UUID | str) -> Payload:
        """The stored parts of the delivery's mail (raises DeliveryNotFound)."""
        return self._read(ops.payload_of(self.tables, as_delivery_id(delivery_id)))

    @_translated
    def list_attempts(self, delivery_id: uuid.UUID | str) -> list[Attempt]:
        """Every attempt of the delivery, by attempt_no (raises DeliveryNotFound)."""
        return self._read(ops.attempts_of(self.tables, as_delivery_id(delivery_id)))

    @_translated
    def list_dead_letters(self, offset: int = 0, limit: int = 50) -> Page[DeadLetter]:
        """A page of dead letters, newest first.

        A delivery that was dead-lettered, resent and dead-lettered again has
        one row per time: the list is an archive, not the current state.
        """
        check_page(offset, limit)
        items, total = self._read(ops.list_dead_letters(self.tables, offset=offset, limit=limit))
        return Page(items, total, offset, limit)

    @_translated
    def count_by_status(self) -> dict[Status, int]:
        """Number of deliveries in each state; every state is present, zeros included."""
        return self._read(ops.count_by_status(self.tables))

    @_translated
    def count_active(self) -> dict[Status, int]:
        """Deliveries pending, retrying and sending: what count_by_status gives for those
        three, read from the partial indexes, so it costs the backlog, not the history."""
        return self._read(ops.count_active(self.tables))

    @_translated
    def queue_health(self) -> tuple[float, int]:
        """(seconds the oldest due delivery has waited, leases in flight)."""
        return self._read(ops.queue_health(self.tables))

    # repair

    @_translated
    def resend(self, delivery_id: uuid.UUID | str) -> Delivery:
        """Re-arm a delivery for a fresh cycle of attempts, due now.

        Applies to every state but `sent` (ResendOnSent) and `sending`
        (InvalidTransition: a worker holds it; try again once it completes).
        attempts resets to 0 and expires_at is cleared; the attempt history is
        kept and its numbering continues. Raises DeliveryNotFound.
        """
        return self._write(ops.resend(self.tables, as_delivery_id(delivery_id)))

    @_translated
    def cancel(self, delivery_id: uuid.UUID | str) -> Delivery:
        """Cancel a pending or retrying delivery; it will not be sent.

        Raises DeliveryNotFound, or InvalidTransition for a delivery in flight
        or already finished. A cancelled delivery can be resent.
        """
        return self._write(ops.cancel(self.tables, as_delivery_id(delivery_id)))

    @_translated
    def purge(self, older_than: timedelta = timedelta(days=30), *, batch_size: int = 1000) -> int:
        """Delete finished deliveries (sent, dead-lettered, cancelled) older than `older_than`.

        Age counts from the delivery's last change. Payloads, recipients,
        attempts and dead letters go with them. Works in batches of
        `batch_size`, each its own short transaction, so it never holds many
        locks or a long transaction; returns how many deliveries were deleted.
        """
        check_purge(older_than, batch_size)
        total = 0
        while True:
            deleted = self._write(
                ops.purge_batch(
                    self.tables, older_than_seconds=older_than.total_seconds(), batch=batch_size
                )
            )
            total += deleted
            if deleted < batch_size:
                return total
