"""The outbox's data operations as plans: pure generators of statements.

A plan yields `Query` objects (a statement from statements.py, its
parameters, and how to fetch its result) and receives each result back; its
return value is the operation's answer. Plans hold every decision made
between statements (duplicate lookups, "not found or wrong state?"), so the
sync store (store.py) and the async store (aio.py) are thin loops that run
the very same plans, and no SQL or logic exists twice.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import psycopg
import sqlalchemy as sa

from . import statements as st
from .errors import DeliveryNotFound, InvalidTransition, ResendOnSent
from .mail import PreparedMail
from .records import (
    Attempt,
    ClaimedDelivery,
    Completion,
    DeadLetter,
    Delivery,
    Payload,
    Recipient,
)
from .schema import ACTIVE_STATUSES, WAITING_STATUSES, Kind, Outcome, Status, Tables

T = TypeVar("T")
Fetch = Literal["all", "scalars", "rowcount", "none"]


@dataclass(frozen=True)
class Query:
    """One statement to execute, and which part of its result the plan wants back.

    `arrays`: the statement is compiled once for the driver and run on psycopg
    as is (`driver_sql`): the batch statements, whose array parameters (batches
    through unnest) are sent in binary format, and any other whose parameters
    need no SQLAlchemy processing.
    """

    statement: sa.Executable
    params: Mapping[str, Any] | None = None
    fetch: Fetch = "all"
    arrays: bool = False


_ARRAY_PLACEHOLDER = re.compile(r"%\((in_\w+|exclude|delivery_ids)\)s")


def driver_call(query: Query, dialect: sa.Dialect) -> tuple[str, dict[str, Any]]:
    """SQL and parameters to run an `arrays` query with exec_driver_sql (see driver_sql)."""
    sql, defaults = driver_sql(query.statement, dialect)
    return sql, {**defaults, **(query.params or {})}


@functools.lru_cache(maxsize=64)
def driver_sql(statement: sa.Executable, dialect: sa.Dialect) -> tuple[str, dict[str, Any]]:
    """The statement compiled once for the driver, array placeholders in binary format.

    psycopg dumps a list as a text array by default, quoting every element; for
    a batch of a hundred mails that was most of the client's time. `%(name)b`
    asks for the binary format. Returns the SQL and the values of the
    statement's own literal parameters. Only for statements whose binds need no
    SQLAlchemy processing (UUIDs, numbers, text, bytes, timestamps: psycopg
    adapts them natively) and whose result columns need none either.
    """
    compiled = cast(sa.ClauseElement, statement).compile(dialect=dialect)
    return _ARRAY_PLACEHOLDER.sub(r"%(\1)b", compiled.string), dict(compiled.params)


# Execution option of driver queries; see use_binary_results.
BINARY_RESULTS = {"mailoutbox_binary_results": True}
_binary_engines: weakref.WeakSet[sa.Engine] = weakref.WeakSet()
_binary_engines_lock = threading.Lock()


def use_binary_results(engine: sa.Engine) -> None:
    """Have `engine` read the rows of driver queries (BINARY_RESULTS) in binary format.

    A claim returns a 1 KB body (bytea), recipient arrays and timestamps per
    delivery: in text format their parsing (bytea as hex, arrays quoted) cost a
    worker more than rendering the message. Binary results load into the same
    Python types. Only our own driver queries opt in; the host's statements on
    the same engine are untouched.
    """
    # Called before every driver query: the lock is only for an engine's first time.
    if engine in _binary_engines:
        return
    with _binary_engines_lock:
        if engine not in _binary_engines:
            sa.event.listen(engine, "before_cursor_execute", _ask_binary_results)
            _binary_engines.add(engine)


def _ask_binary_results(
    conn: sa.Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: sa.engine.ExecutionContext | None,
    executemany: bool,
) -> None:
    if context is not None and context.execution_options.get("mailoutbox_binary_results"):
        # An asyncio engine hands over SQLAlchemy's adapter; psycopg's cursor is inside.
        getattr(cursor, "_cursor", cursor).format = psycopg.pq.Format.BINARY


# A plan yields Queries, is sent each one's fetched result, and returns its answer.
Plan = Generator[Query, Any, T]


def fetch_rows(cursor: psycopg.Cursor[Any], how: Fetch) -> Any:
    """fetch() for a psycopg cursor (direct.DirectConnection); rows come back as tuples."""
    if how == "all":
        return cursor.fetchall()
    if how == "scalars":
        return [row[0] for row in cursor.fetchall()]
    if how == "rowcount":
        return cursor.rowcount
    return None


def fetch(result: sa.CursorResult[Any], how: Fetch) -> Any:
    """Take what a Query asked for out of a (buffered) result; shared by both stores."""
    if how == "all":
        return result.all()
    if how == "scalars":
        return result.scalars().all()
    if how == "rowcount":
        return result.rowcount
    return None


# --- parameters (pure) --------------------------------------------------------------------


@dataclass(frozen=True)
class EnqueueBatch:
    """The array parameters of one insert_enqueue execution, and the ids it proposes."""

    params: dict[str, list[Any]]
    delivery_ids: list[uuid.UUID]


# RFC 9562 version 7: 48 bits of Unix time in milliseconds, the version nibble 7,
# 12 random bits, the variant bits 10, 62 random bits.
_V7_RANDOM_BITS = (0xFFF << 64) | ((1 << 62) - 1)
_V7_VERSION_AND_VARIANT = (0x7 << 76) | (0b10 << 62)


def time_ordered_uuids(count: int) -> list[uuid.UUID]:
    """`count` new ids: version-7 UUIDs (RFC 9562), from one clock read and one os.urandom call.

    They start with the time in milliseconds, so mail enqueued together gets
    neighbouring ids: inserts land on the few rightmost pages of the primary-key
    index instead of a random page each (enqueue_many +5-22 % at 100,000 rows,
    benchmarks/README.md). 74 random bits keep them unguessable and unique
    across processes. The time is the client's and only orders the index:
    nothing is scheduled by it (that is the database's now()). uuid4() would ask
    the kernel for 16 bytes per id; UUID(int=...) skips the checks of bytes=
    and version=.
    """
    millis = time.time_ns() // 1_000_000
    prefix = (millis & 0xFFFF_FFFF_FFFF) << 80 | _V7_VERSION_AND_VARIANT
    raw = os.urandom(16 * count)
    from_bytes = int.from_bytes
    return [
        uuid.UUID(int=prefix | from_bytes(raw[i : i + 16], "big") & _V7_RANDOM_BITS)
        for i in range(0, 16 * count, 16)
    ]


def headers_json(headers: Sequence[tuple[str, str]]) -> str:
    """A payload's extra headers as stored: a JSON array of [name, value] pairs."""
    return json.dumps(headers) if headers else "[]"


def enqueue_params(mails: Sequence[PreparedMail]) -> EnqueueBatch:
    """insert_enqueue's arrays for `mails`, built a column at a time."""
    count = len(mails)
    delivery_ids = time_ordered_uuids(count)
    payloads = [m.payload for m in mails]
    columns: dict[str, list[Any]] = {
        "delivery_id": delivery_ids,
        "template_id": [m.template_id for m in mails],
        "idempotency_key": [m.idempotency_key for m in mails],
        "send_at": [m.send_at for m in mails],
        "expires_at": [m.expires_at for m in mails],
        "content_type": [p.content_type for p in payloads],
        "subject": [p.subject for p in payloads],
        "body": [p.body for p in payloads],
        "html_body": [p.html_body for p in payloads],
        "sender": [p.sender for p in payloads],
        "headers": [headers_json(p.headers) for p in payloads],
        "ordinal": list(range(count)),
        "r_delivery_id": [
            i for i, m in zip(delivery_ids, mails, strict=True) for _ in m.recipients
        ],
        "r_address": [r.address for m in mails for r in m.recipients],
        "r_kind": [r.kind.value for m in mails for r in m.recipients],
        "r_position": [n for m in mails for n in range(len(m.recipients))],
    }
    return EnqueueBatch(_array_params(columns), delivery_ids)


def enqueue_one_params(mail: PreparedMail, delivery_id: uuid.UUID) -> dict[str, Any]:
    """insert_enqueue_one's parameters for `mail`, proposing `delivery_id`."""
    p = mail.payload
    values: dict[str, Any] = {
        "delivery_id": delivery_id,
        "template_id": mail.template_id,
        "idempotency_key": mail.idempotency_key,
        "send_at": mail.send_at,
        "expires_at": mail.expires_at,
        "content_type": p.content_type,
        "subject": p.subject,
        "body": p.body,
        "html_body": p.html_body,
        "sender": p.sender,
        "headers": headers_json(p.headers),
        "r_address": [r.address for r in mail.recipients],
        "r_kind": [r.kind.value for r in mail.recipients],
    }
    return {st.array_param(name): value for name, value in values.items()}


def completion_params(completions: Sequence[Completion]) -> dict[str, list[Any]]:
    params: dict[str, list[Any]] = {name: [] for name, _ in st.COMPLETION_ARRAYS}
    for c in completions:
        a = c.attempt
        for name, value in (
            ("delivery_id", c.delivery_id),
            ("claim_token", c.claim_token),
            ("status", Status(c.status).value),
            ("retry_delay", max(0.0, float(c.retry_delay_seconds))),
            ("reason", c.reason),
            ("outcome", None if a is None else Outcome(a.outcome).value),
            ("duration", 0.0 if a is None else max(0.0, a.duration_seconds)),
            ("error", "" if a is None else a.error),
            ("error_class", None if a is None else a.error_class),
            ("smtp_code", None if a is None else a.smtp_code),
            ("smtp_enhanced_code", None if a is None else a.smtp_enhanced_code),
            ("refused", None if a is None or a.refused is None else json.dumps(a.refused)),
            ("worker", c.worker),
            ("refund", int(c.refund_attempt)),
            ("settled", "\n".join(c.settled_recipients) if c.settled_recipients else None),
        ):
            params[name].append(value)
    return _array_params(params)


def _array_params(columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {st.array_param(name): values for name, values in columns.items()}


# --- rows -> records (pure) ---------------------------------------------------------------


def delivery_from_row(row: Any) -> Delivery:
    m = row._mapping
    return Delivery(
        **{
            name: m[name]
            for name in st.DELIVERY_COLUMNS
            if name not in ("status", "settled_recipients")
        },
        status=Status(m["status"]),
        settled_recipients=tuple(m["settled_recipients"] or ()),
    )


def attempt_from_row(row: Any) -> Attempt:
    m = row._mapping
    values = {name: m[name] for name in st.ATTEMPT_COLUMNS}
    values["outcome"] = Outcome(values["outcome"])
    return Attempt(**values)


def dead_letter_from_row(row: Any) -> DeadLetter:
    m = row._mapping
    return DeadLetter(m["dead_letter_id"], m["delivery_id"], m["archived_at"], m["reason"])


def payload_from_row(row: Any) -> Payload:
    m = row._mapping
    return Payload(
        content_type=m["content_type"],
        subject=m["subject"],
        body=bytes(m["body"]),
        html_body=m["html_body"],
        sender=m["sender"],
        headers=_headers(m["headers"]),
    )


def _headers(stored: Any) -> tuple[tuple[str, str], ...]:
    return tuple((str(n), str(v)) for n, v in stored) if stored else ()


_STATUS_OF = {s.value: s for s in Status}
_KIND_OF = {k.value: k for k in Kind}


def claimed_from_row(row: Sequence[Any]) -> ClaimedDelivery:
    """A claim's row (columns in statements.CLAIM_RESULT order) as a ClaimedDelivery.

    Unpacked by position: a worker decodes every row it sends, and name lookups
    through the row's mapping cost as much as the rest of the conversion.
    """
    (
        delivery_id,
        template_id,
        idempotency_key,
        attempts,
        created_at,
        cycle_started_at,
        expires_at,
        claim_token,
        locked_until,
        previous_status,
        claimed_at,
        content_type,
        subject,
        body,
        html_body,
        sender,
        headers,
        addresses,
        kinds,
        settled_recipients,
    ) = row
    return ClaimedDelivery(
        delivery_id=delivery_id,
        template_id=template_id,
        idempotency_key=idempotency_key,
        attempts=attempts,
        created_at=created_at,
        cycle_started_at=cycle_started_at,
        expires_at=expires_at,
        claim_token=claim_token,
        claimed_at=claimed_at,
        locked_until=locked_until,
        previous_status=_STATUS_OF[previous_status],
        payload=Payload(
            content_type=content_type,
            subject=subject,
            body=bytes(body),
            html_body=html_body,
            sender=sender,
            headers=_headers(headers),
        ),
        recipients=tuple(
            Recipient(address, _KIND_OF[kind])
            for address, kind in zip(addresses or (), kinds or (), strict=False)
        ),
        settled_recipients=tuple(settled_recipients) if settled_recipients else (),
    )


def status_counts(rows: Iterable[Any]) -> dict[Status, int]:
    counts = {status: 0 for status in Status}
    for status, count in rows:
        counts[Status(status)] = int(count)
    return counts


# --- plans --------------------------------------------------------------------------------


def insert_enqueue(
    t: Tables, mails: Sequence[PreparedMail], *, notify_after_commit: bool = False
) -> Plan[list[tuple[uuid.UUID, bool]]]:
    """Insert `mails`; answer (delivery_id, created) per mail, in input order.

    One statement for the whole batch, plus one lookup only when some mails
    were duplicates of existing (or earlier) deliveries. A duplicate whose
    delivery a concurrent purge deleted between the two is inserted again. A single mail takes
    insert_enqueue_one, which is cheaper to encode. `notify_after_commit`: the
    enqueue trigger stays quiet and the caller notifies once committed (notify.py).
    """
    if not mails:
        return []
    if len(mails) == 1:
        one = insert_enqueue_one(t, mails[0], notify_after_commit=notify_after_commit)
        return [(yield from one)]
    batch = enqueue_params(mails)
    statement = st.insert_enqueue(t, notify_after_commit)
    created = set((yield Query(statement, batch.params, "scalars", arrays=True)))
    missing = [m for m, i in zip(mails, batch.delivery_ids, strict=True) if i not in created]
    existing = (yield from existing_ids(t, missing)) if missing else {}
    answers = {key: (delivery_id, False) for key, delivery_id in existing.items()}
    vanished = [m for m in missing if (m.template_id, m.idempotency_key) not in existing]
    if vanished:
        again = yield from insert_enqueue(t, vanished, notify_after_commit=notify_after_commit)
        answers.update(
            ((m.template_id, m.idempotency_key), answer)
            for m, answer in zip(vanished, again, strict=True)
        )
    return [
        (proposed, True)
        if proposed in created
        else answers[(mail.template_id, mail.idempotency_key)]
        for mail, proposed in zip(mails, batch.delivery_ids, strict=True)
    ]


def insert_enqueue_one(
    t: Tables, mail: PreparedMail, *, notify_after_commit: bool = False
) -> Plan[tuple[uuid.UUID, bool]]:
    """Insert one mail; answer (delivery_id, created), as insert_enqueue does for a batch.

    The statement reports how many recipients it wrote, none for a duplicate.
    Only then is the id looked up, and it still counts as created if it is the
    one proposed (a mail without recipients, which prepare() never lets through).
    """
    [proposed] = time_ordered_uuids(1)
    params = enqueue_one_params(mail, proposed)
    statement = st.insert_enqueue_one(t, notify_after_commit)
    if (yield Query(statement, params, "rowcount", arrays=True)):
        return proposed, True
    existing = yield from existing_ids(t, [mail])
    delivery_id = existing.get((mail.template_id, mail.idempotency_key))
    if delivery_id is None:
        # The delivery the insert collided with was purged (finished and old) before
        # the lookup: the key is free again, so this mail is new after all.
        return (yield from insert_enqueue_one(t, mail, notify_after_commit=notify_after_commit))
    return delivery_id, delivery_id == proposed


def existing_ids(
    t: Tables, mails: Sequence[PreparedMail]
) -> Plan[dict[tuple[str, str], uuid.UUID]]:
    """The delivery ids already stored for the (template_id, idempotency_key) of `mails`."""
    keys = {
        "template_id": [m.template_id for m in mails],
        "idempotency_key": [m.idempotency_key for m in mails],
    }
    rows = yield Query(st.select_existing_ids(t), _array_params(keys), arrays=True)
    return {(template_id, key): delivery_id for template_id, key, delivery_id in rows}


def claim_due(
    t: Tables,
    *,
    limit: int,
    worker: str,
    lease_seconds: float,
    exclude: Sequence[uuid.UUID] = (),
    claim_token: uuid.UUID | None = None,
) -> Plan[list[ClaimedDelivery]]:
    """Lease up to `limit` due deliveries (see statements.claim_due); commit right after."""
    params = {
        "worker": worker,
        "lease_seconds": float(lease_seconds),
        "exclude": list(exclude),
        "token": claim_token or uuid.uuid4(),
    }
    rows = yield Query(st.claim_due(t, limit), params, arrays=True)
    return [claimed_from_row(row) for row in rows]


def complete(t: Tables, completions: Sequence[Completion]) -> Plan[set[uuid.UUID]]:
    """Apply completions in one statement; answer the ids whose claim still held."""
    if not completions:
        return set()
    ids = yield Query(
        st.complete_claimed(t), completion_params(completions), "scalars", arrays=True
    )
    return set(ids)


def release(t: Tables, delivery_ids: Sequence[uuid.UUID], claim_token: uuid.UUID) -> Plan[int]:
    """Hand unsent leased deliveries back as due now; answer how many were released.

    Listening workers are woken once the transaction commits: otherwise a worker
    that stops (a rolling deploy) leaves its handed-back mail to the others' next
    poll, only an update away from where an enqueue's trigger would have notified.
    """
    if not delivery_ids:
        return 0
    params = {"delivery_ids": list(delivery_ids), "token": claim_token}
    released = int((yield Query(st.release_claimed(t), params, "rowcount", arrays=True)))
    if released:
        yield from notify_due(t)
    return released


def get_delivery(t: Tables, delivery_id: uuid.UUID) -> Plan[Delivery | None]:
    rows = yield Query(st.select_delivery(t), {"delivery_id": delivery_id})
    return delivery_from_row(rows[0]) if rows else None


def require_delivery(t: Tables, delivery_id: uuid.UUID) -> Plan[Delivery]:
    """The delivery, or DeliveryNotFound."""
    delivery = yield from get_delivery(t, delivery_id)
    if delivery is None:
        raise DeliveryNotFound(delivery_id)
    return delivery


def list_deliveries(
    t: Tables,
    *,
    offset: int,
    limit: int,
    status: Status | None = None,
    template_id: str | None = None,
) -> Plan[tuple[list[Delivery], int]]:
    filters: dict[str, Any] = {}
    if status is not None:
        filters["status"] = Status(status).value
    if template_id is not None:
        filters["template_id"] = template_id
    [(total,)] = yield Query(
        st.count_deliveries(t, status=status, template_id=template_id), filters
    )
    rows = yield Query(
        st.list_deliveries(t, status=status, template_id=template_id),
        {**filters, "offset": offset, "limit": limit},
    )
    return [delivery_from_row(row) for row in rows], int(total)


def recipients_of(t: Tables, delivery_id: uuid.UUID) -> Plan[list[Recipient]]:
    """The recipients of an existing delivery (DeliveryNotFound otherwise)."""
    yield from require_delivery(t, delivery_id)
    return (yield from list_recipients(t, delivery_id))


def payload_of(t: Tables, delivery_id: uuid.UUID) -> Plan[Payload]:
    """The stored parts of an existing delivery (DeliveryNotFound otherwise)."""
    payload = yield from get_payload(t, delivery_id)
    if payload is None:
        raise DeliveryNotFound(delivery_id)
    return payload


def attempts_of(t: Tables, delivery_id: uuid.UUID) -> Plan[list[Attempt]]:
    """The attempts of an existing delivery (DeliveryNotFound otherwise)."""
    yield from require_delivery(t, delivery_id)
    return (yield from list_attempts(t, delivery_id))


def list_recipients(t: Tables, delivery_id: uuid.UUID) -> Plan[list[Recipient]]:
    rows = yield Query(st.select_recipients(t), {"delivery_id": delivery_id})
    return [Recipient(row.address, Kind(row.kind)) for row in rows]


def get_payload(t: Tables, delivery_id: uuid.UUID) -> Plan[Payload | None]:
    rows = yield Query(st.select_payload(t), {"delivery_id": delivery_id})
    return payload_from_row(rows[0]) if rows else None


def list_attempts(t: Tables, delivery_id: uuid.UUID) -> Plan[list[Attempt]]:
    rows = yield Query(st.select_attempts(t), {"delivery_id": delivery_id})
    return [attempt_from_row(row) for row in rows]


def list_dead_letters(t: Tables, *, offset: int, limit: int) -> Plan[tuple[list[DeadLetter], int]]:
    [(total,)] = yield Query(st.count_dead_letters(t))
    rows = yield Query(st.list_dead_letters(t), {"offset": offset, "limit": limit})
    return [dead_letter_from_row(row) for row in rows], int(total)


def count_by_status(t: Tables) -> Plan[dict[Status, int]]:
    return status_counts((yield Query(st.count_by_status(t))))


def count_active(t: Tables) -> Plan[dict[Status, int]]:
    """Deliveries pending, retrying and sending; every one of the three present."""
    counts = status_counts((yield Query(st.count_active(t))))
    return {status: counts[status] for status in ACTIVE_STATUSES}


def queue_health(t: Tables) -> Plan[tuple[float, int]]:
    """(age in seconds of the oldest due delivery, leases in flight)."""
    [row] = yield Query(st.select_queue_health(t))
    return float(row.oldest_due_seconds), int(row.leased)


def resend(t: Tables, delivery_id: uuid.UUID) -> Plan[Delivery]:
    """Re-arm a delivery, or raise why not (DeliveryNotFound, ResendOnSent, InvalidTransition)."""

    def refuse(current: Delivery) -> None:
        if current.status is Status.SENT:
            raise ResendOnSent(delivery_id)
        if current.status is Status.SENDING:
            raise InvalidTransition(delivery_id, current.status.value, "resend")

    update = Query(st.resend_unless_sent_or_sending(t), {"target_id": delivery_id})
    delivery = yield from guarded_transition(t, delivery_id, update, refuse)
    yield from notify_due(t)
    return delivery


def guarded_transition(
    t: Tables, delivery_id: uuid.UUID, update: Query, refuse: Callable[[Delivery], None]
) -> Plan[Delivery]:
    """Run an operator's status-guarded UPDATE; answer the delivery it changed.

    The guarded UPDATE decides. When it matches nothing the row is read under a
    lock and `refuse` raises for the state that refused it. A state it accepts
    means a worker's completion committed in between (sending back to
    retrying, or on to dead_lettered): the UPDATE runs again, now under the
    lock, rather than a refusal naming a state the operation accepts (F9, F15).
    """
    rows = yield update
    if not rows:
        locked = yield Query(st.lock_delivery(t), {"delivery_id": delivery_id})
        if not locked:
            raise DeliveryNotFound(delivery_id)
        refuse(delivery_from_row(locked[0]))
        rows = yield update
    return delivery_from_row(rows[0])


def notify_due(t: Tables) -> Plan[None]:
    """Wake listening workers once the transaction commits."""
    yield Query(st.notify_due(t), fetch="none", arrays=True)


def cancel(t: Tables, delivery_id: uuid.UUID) -> Plan[Delivery]:
    """Cancel a waiting delivery, or raise why not (DeliveryNotFound, InvalidTransition)."""

    def refuse(current: Delivery) -> None:
        if current.status not in WAITING_STATUSES:
            raise InvalidTransition(delivery_id, current.status.value, "cancel")

    update = Query(st.cancel_if_waiting(t), {"target_id": delivery_id})
    return (yield from guarded_transition(t, delivery_id, update, refuse))


def purge_batch(t: Tables, *, older_than_seconds: float, batch: int) -> Plan[int]:
    params = {"age_seconds": float(older_than_seconds), "batch": batch}
    [(count,)] = yield Query(st.purge_terminal_batch(t), params)
    return int(count)
