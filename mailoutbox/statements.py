"""Pure builders of the Core statements the stores execute. No I/O here.

Every builder takes the `Tables` of one schema and returns a statement whose
values arrive as bind parameters at execution time, so each statement is built
once per schema (cached) and its compiled form is reused by SQLAlchemy's cache.
Batches travel as parallel arrays and come back out through `unnest`, which
makes a batch of any size one statement and one round trip.

Status constants are rendered as SQL literals, not bind parameters, wherever a
partial index must match: the planner can only use `mail_deliveries_due_idx`
(or `mail_deliveries_leased_idx`) when it can prove the query's status filter
implies the index predicate.
"""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import aggregate_order_by

from .schema import (
    TERMINAL_STATUSES,
    WAITING_STATUSES,
    Outcome,
    Status,
    Tables,
)

UUID = pg.UUID(as_uuid=True)
TZ = sa.DateTime(timezone=True)
_NOW = sa.func.now()


def _lit(status: Status | Outcome) -> sa.ColumnElement[str]:
    return sa.literal_column(f"'{status.value}'", sa.Text)


def _status_in(
    column: sa.ColumnElement[str], statuses: tuple[Status, ...]
) -> sa.ColumnElement[bool]:
    return column.in_([_lit(s) for s in statuses])


def _array(name: str, item_type: Any) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=pg.ARRAY(item_type))


def _seconds(value: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    return value * sa.literal_column("interval '1 second'", sa.Interval)


def array_param(column: str) -> str:
    """The bind parameter name carrying the array for an unnest column.

    Prefixed so that no parameter is named like a column of an UPDATE's target
    table (SQLAlchemy would otherwise add it to the SET clause).
    """
    return f"in_{column}"


def _unnest(name: str, *columns: tuple[str, Any]) -> sa.CTE:
    """A CTE over parallel array parameters: unnest(:in_a, :in_b, ...) AS name(a, b, ...)."""
    fn = sa.func.unnest(*(_array(array_param(col), typ) for col, typ in columns))
    rows = fn.table_valued(*(sa.column(col, typ) for col, typ in columns)).render_derived(
        name=f"{name}_rows"
    )
    return sa.select(*rows.c).cte(name)


# clock_timestamp() in milliseconds over the first 48 bits of a random UUID, then the
# version nibble set to 7: RFC 9562's layout, with 74 random bits left.
_V7_UUID_SQL = (
    "encode(set_byte(overlay(uuid_send(gen_random_uuid()) placing "
    "substring(int8send((date_part('epoch', clock_timestamp()) * 1000)::int8) from 3) "
    "from 1 for 6), 6, 112 + floor(random() * 16)::int), 'hex')::uuid"
)


def new_row_id() -> sa.ColumnElement[Any]:
    """A version-7 UUID made by the server: the id of a recipient, attempt or dead letter.

    These tables only grow. A random id puts each insert on a random leaf of the
    primary key, and after every checkpoint the first change to a leaf writes
    the whole 8 KB page to the WAL; ids that begin with the time append to the
    same few leaves instead. With 2,000,000 attempts in the history, a drain
    right after a checkpoint wrote 4.45 KB of WAL per delivery with random
    attempt ids and 1.95 KB with these (benchmarks/README.md, session 10).
    PostgreSQL 18's uuidv7() does the same; this expression runs on 13 and later too.
    """
    return sa.literal_column(_V7_UUID_SQL, UUID)


def _attempt_numbered(t: Tables, appends: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    """The new `last_attempt_no` of a delivery an UPDATE changes: one more where the
    statement `appends` an attempt for it (which takes that number), else as it was.

    Attempt numbers are monotonic across resend cycles. Safe without extra locking
    because only the holder of the delivery's claim token (or its row lock) appends
    attempts, and the unique (delivery_id, attempt_no) constraint would catch
    anyone else. A row from before migration 0004 has no number yet (NULL) and
    takes MAX(attempt_no) of its history, once.
    """
    d, a = t.deliveries, t.attempts
    history = (
        sa.select(sa.func.coalesce(sa.func.max(a.c.attempt_no), 0))
        .where(a.c.delivery_id == d.c.delivery_id)
        .scalar_subquery()
    )
    return sa.case(
        (appends, sa.func.coalesce(d.c.last_attempt_no, history) + 1),
        else_=d.c.last_attempt_no,
    )


DELIVERY_COLUMNS = (
    "delivery_id",
    "template_id",
    "idempotency_key",
    "status",
    "attempts",
    "next_attempt_at",
    "payload_id",
    "last_error",
    "created_at",
    "updated_at",
    "sent_at",
    "dead_lettered_at",
    "expires_at",
    "locked_by",
    "locked_until",
    "settled_recipients",
)


ATTEMPT_COLUMNS = (
    "attempt_id",
    "delivery_id",
    "attempt_no",
    "started_at",
    "finished_at",
    "outcome",
    "error",
    "error_class",
    "smtp_code",
    "smtp_enhanced_code",
    "refused",
    "worker",
)


def delivery_columns(t: Tables) -> list[sa.Column[Any]]:
    return [t.deliveries.c[name] for name in DELIVERY_COLUMNS]


# --- enqueue -----------------------------------------------------------------------------

ENQUEUE_MAIL_ARRAYS = (
    ("delivery_id", UUID),
    ("template_id", sa.Text),
    ("idempotency_key", sa.Text),
    ("send_at", TZ),
    ("expires_at", TZ),
    ("content_type", sa.Text),
    ("subject", sa.Text),
    ("body", sa.LargeBinary),
    ("html_body", sa.Text),
    ("sender", sa.Text),
    ("headers", sa.Text),
    ("ordinal", sa.Integer),
)
ENQUEUE_RECIPIENT_ARRAYS = (
    ("r_delivery_id", UUID),
    ("r_address", sa.Text),
    ("r_kind", sa.Text),
    ("r_position", sa.SmallInteger),
)


# Set for its transaction, it keeps the enqueue trigger from notifying (migration 0002):
# the outbox then sends the NOTIFY after the commit itself (notify.py).
NOTIFY_AFTER_COMMIT_SETTING = "mailoutbox.notify_after_commit"


def _notify_after_commit() -> sa.CTE:
    """A one-row CTE that sets NOTIFY_AFTER_COMMIT_SETTING when a statement joins it.

    The enqueue trigger is AFTER ... FOR EACH STATEMENT: it fires once the whole
    statement, this CTE included, has run, and so reads the setting.
    """
    setting = sa.func.set_config(
        sa.literal_column(f"'{NOTIFY_AFTER_COMMIT_SETTING}'"),
        sa.literal_column("'on'"),
        sa.true(),  # local to the transaction
    )
    return sa.select(setting.label("setting")).cte("notify_after_commit")


def _cycle_start(send_at: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """When a new delivery's retry age (RetryPolicy.max_age) starts: its send_at, or now
    if that is earlier or unset. A send_at already past (computed late: "remind three
    days before") would otherwise have spent the retry budget before the first try,
    and the first greylisting 451 would dead-letter the mail."""
    return sa.func.greatest(send_at, _NOW)


@functools.lru_cache(maxsize=32)
def insert_enqueue(t: Tables, notify_after_commit: bool = False) -> sa.Select[Any]:
    """Insert a batch of mails (payload, delivery, recipients) in one statement.

    Returns the delivery_id of every delivery it created. A mail whose
    (template_id, idempotency_key) already exists, or repeats an earlier mail of
    the same batch, is skipped by ON CONFLICT DO NOTHING, and its payload and
    recipients are skipped with it (they join on the deliveries actually
    inserted), so a duplicate leaves no orphan rows and never raises, leaving
    the caller's transaction usable. The foreign key from deliveries to payloads
    is checked at the end of the statement, after both CTEs have run.

    `notify_after_commit`: the enqueue trigger stays quiet; the caller notifies
    after its commit (notify.py).
    """
    d, p, r = t.deliveries, t.payloads, t.recipients
    mails = _unnest("enqueue_input", *ENQUEUE_MAIL_ARRAYS)
    inserted = (
        pg.insert(d)
        .from_select(
            [
                "delivery_id",
                "template_id",
                "idempotency_key",
                "status",
                "next_attempt_at",
                "payload_id",
                "expires_at",
                "cycle_started_at",
            ],
            sa.select(
                mails.c.delivery_id,
                mails.c.template_id,
                mails.c.idempotency_key,
                _lit(Status.PENDING),
                sa.func.coalesce(mails.c.send_at, _NOW),
                # The payload (one per delivery) takes its delivery's id: no UUID to make
                # or send, and a time-ordered one (operations.time_ordered_uuids), so the
                # payloads' primary key is appended to rather than written at random.
                mails.c.delivery_id,
                mails.c.expires_at,
                _cycle_start(mails.c.send_at),
            )
            # A canonical order: two batches sharing keys lock their unique-index entries
            # in the same order and cannot deadlock. Among repeats of one key in a batch,
            # the first in input order wins.
            .order_by(mails.c.template_id, mails.c.idempotency_key, mails.c.ordinal),
        )
        .on_conflict_do_nothing(index_elements=["template_id", "idempotency_key"])
        .returning(d.c.delivery_id, d.c.payload_id)
        .cte("inserted_deliveries")
    )
    payloads = (
        pg.insert(p)
        .from_select(
            ["payload_id", "content_type", "subject", "body", "html_body", "sender", "headers"],
            sa.select(
                inserted.c.payload_id,
                mails.c.content_type,
                mails.c.subject,
                mails.c.body,
                mails.c.html_body,
                mails.c.sender,
                sa.cast(mails.c.headers, pg.JSONB),
            ).join(inserted, inserted.c.delivery_id == mails.c.delivery_id),
        )
        .cte("inserted_payloads")
    )
    rcpts = _unnest("enqueue_recipients", *ENQUEUE_RECIPIENT_ARRAYS)
    recipients = (
        pg.insert(r)
        .from_select(
            ["recipient_id", "delivery_id", "address", "kind", "position"],
            sa.select(
                new_row_id(),
                rcpts.c.r_delivery_id,
                rcpts.c.r_address,
                rcpts.c.r_kind,
                rcpts.c.r_position,
            ).join(inserted, inserted.c.delivery_id == rcpts.c.r_delivery_id),
        )
        .cte("inserted_recipients")
    )
    # Data-modifying CTEs run whether or not the main query reads them; add_cte makes
    # SQLAlchemy render the two that nothing selects from.
    created = sa.select(inserted.c.delivery_id).add_cte(payloads, recipients)
    if notify_after_commit:
        created = created.join_from(inserted, _notify_after_commit(), sa.true())
    return created


# The one-mail statement's scalar parameters (bound as array_param(name), so that they
# travel in binary format too); its recipients still come as arrays.
ENQUEUE_ONE_MAIL_PARAMS = tuple(
    (name, typ) for name, typ in ENQUEUE_MAIL_ARRAYS if name != "ordinal"
)
ENQUEUE_ONE_RECIPIENT_ARRAYS = (("r_address", sa.Text), ("r_kind", sa.Text))


@functools.lru_cache(maxsize=32)
def insert_enqueue_one(t: Tables, notify_after_commit: bool = False) -> sa.Insert:
    """insert_enqueue for a single mail, with scalar parameters.

    The same rows, conflict rule and guarantees as insert_enqueue: on a
    duplicate (template_id, idempotency_key) ON CONFLICT DO NOTHING inserts no
    delivery, so the payload and recipients (selected from the inserted
    delivery) are not written either, and nothing raises. Its row count is the
    number of recipients written: 0 for a duplicate. One-element arrays cost
    the client more to encode than the whole insert costs the server, and a
    statement without result rows is cheaper for SQLAlchemy to run, hence
    scalars and no RETURNING. `notify_after_commit` as for insert_enqueue.
    """
    d, p, r = t.deliveries, t.payloads, t.recipients
    v = {name: sa.bindparam(array_param(name), type_=typ) for name, typ in ENQUEUE_ONE_MAIL_PARAMS}
    inserted = (
        pg.insert(d)
        .values(
            delivery_id=v["delivery_id"],
            template_id=v["template_id"],
            idempotency_key=v["idempotency_key"],
            status=_lit(Status.PENDING),
            next_attempt_at=sa.func.coalesce(v["send_at"], _NOW),
            payload_id=v["delivery_id"],  # as in insert_enqueue
            expires_at=v["expires_at"],
            cycle_started_at=_cycle_start(v["send_at"]),
        )
        .on_conflict_do_nothing(index_elements=["template_id", "idempotency_key"])
        .returning(d.c.delivery_id, d.c.payload_id)
        .cte("inserted_delivery")
    )
    payload = (
        pg.insert(p)
        .from_select(
            ["payload_id", "content_type", "subject", "body", "html_body", "sender", "headers"],
            sa.select(
                inserted.c.payload_id,
                v["content_type"],
                v["subject"],
                v["body"],
                v["html_body"],
                v["sender"],
                sa.cast(v["headers"], pg.JSONB),
            ),
        )
        .cte("inserted_payload")
    )
    rows = (
        sa.func.unnest(*(_array(array_param(c), typ) for c, typ in ENQUEUE_ONE_RECIPIENT_ARRAYS))
        .table_valued(
            *(sa.column(c, typ) for c, typ in ENQUEUE_ONE_RECIPIENT_ARRAYS),
            with_ordinality="r_ordinal",
        )
        .render_derived(name="recipient_rows")
    )
    source = inserted.join(rows, sa.true())
    if notify_after_commit:
        source = source.join(_notify_after_commit(), sa.true())
    return (
        pg.insert(r)
        .from_select(
            ["recipient_id", "delivery_id", "address", "kind", "position"],
            sa.select(
                new_row_id(),
                inserted.c.delivery_id,
                rows.c.r_address,
                rows.c.r_kind,
                sa.cast(rows.c.r_ordinal - sa.literal_column("1"), sa.SmallInteger),
            ).select_from(source),
        )
        .add_cte(inserted, payload)
    )


@functools.lru_cache(maxsize=32)
def select_existing_ids(t: Tables) -> sa.Select[Any]:
    """The delivery ids for (template_id, idempotency_key) pairs, for duplicate enqueues."""
    d = t.deliveries
    keys = _unnest("wanted_keys", ("template_id", sa.Text), ("idempotency_key", sa.Text))
    return sa.select(d.c.template_id, d.c.idempotency_key, d.c.delivery_id).join(
        keys,
        sa.and_(
            d.c.template_id == keys.c.template_id,
            d.c.idempotency_key == keys.c.idempotency_key,
        ),
    )


# --- claim -------------------------------------------------------------------------------


# The columns of a claim's rows, in order (operations.claimed_from_row unpacks them).
CLAIM_RESULT = (
    "delivery_id",
    "template_id",
    "idempotency_key",
    "attempts",
    "created_at",
    "cycle_started_at",
    "expires_at",
    "claim_token",
    "locked_until",
    "previous_status",
    "claimed_at",
    "content_type",
    "subject",
    "body",
    "html_body",
    "sender",
    "headers",
    "addresses",
    "kinds",
    "settled_recipients",
)


@functools.lru_cache(maxsize=64)
def claim_due(t: Tables, limit: int) -> sa.Select[Any]:
    """Lease up to `limit` due deliveries to :worker and return them ready to send.

    Parameters: worker, token, lease_seconds, exclude (uuid[]).

    `limit` is written into the statement, not bound: a worker's batch size never
    changes, and a LIMIT the planner cannot see made PostgreSQL plan the prepared
    claim afresh on every execution (its generic plan, costed for an unknown
    LIMIT, never looked cheaper than a custom one): 0.6-0.7 ms per claim.

    Due means pending/retrying with next_attempt_at <= now(), or sending with an
    expired lease (a claim sets next_attempt_at to the lease expiry). A row whose
    lease expired is claimed alone, before anything else: its worker died or hung
    while it was leased, perhaps because of that very row, and a row that kills
    every worker sending it would otherwise be claimed again and again with the
    same batch mates, charging each of them an attempt every time until they were
    all dead-lettered with it. Alone, it is charged its own attempts, and each of
    its former mates one at most. Otherwise waiting rows are claimed, up to
    `limit`, in next_attempt_at order. Each kind is one range scan of its own
    partial index (`mail_deliveries_leased_idx`, `mail_deliveries_due_idx`).
    FOR UPDATE SKIP LOCKED lets concurrent workers take disjoint rows without
    waiting on each other. `exclude` holds the ids this tick already handled, so
    a delivery retried with zero delay is not claimed twice in one tick.
    Attempts are counted at claim time, so a delivery whose send kills its
    worker still runs out of attempts. Taking over an expired lease records a
    `lease_expired` attempt for the worker that lost it. Payload and recipients
    come back in the same round trip.
    """
    d, p, r = t.deliveries, t.payloads, t.recipients

    def due(status: sa.ColumnElement[bool], limit: Any, *also: sa.ColumnElement[bool]) -> Any:
        return (
            sa.select(
                d.c.delivery_id,
                d.c.status.label("previous_status"),
                d.c.locked_by.label("previous_worker"),
                d.c.updated_at.label("previous_claimed_at"),
                d.c.next_attempt_at.label("due_at"),
            )
            .where(
                status,
                d.c.next_attempt_at <= _NOW,
                d.c.delivery_id != sa.func.all(_array("exclude", UUID)),
                *also,
            )
            .order_by(d.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )

    expired = due(d.c.status == _lit(Status.SENDING), sa.literal_column("1")).cte("expired_lease")
    waiting = due(
        _status_in(d.c.status, WAITING_STATUSES),
        sa.literal_column(str(int(limit))),
        ~sa.exists(sa.select(expired.c.delivery_id)),
    ).cte("waiting")
    picked = sa.union_all(sa.select(expired), sa.select(waiting)).cte("picked")
    lease_end = _NOW + _seconds(sa.bindparam("lease_seconds", type_=sa.Float))
    claimed = (
        sa.update(d)
        .where(
            d.c.delivery_id == picked.c.delivery_id,
            # The same rows again as one array: the planner then looks them up by
            # primary key whatever its estimates, instead of (seen) hashing a
            # sequential scan of the whole table against the hundred picked ids.
            d.c.delivery_id
            == sa.func.any(
                sa.cast(
                    sa.select(sa.func.array_agg(picked.c.delivery_id)).scalar_subquery(),
                    pg.ARRAY(UUID),
                )
            ),
        )
        .values(
            status=_lit(Status.SENDING),
            attempts=d.c.attempts + 1,
            locked_by=sa.bindparam("worker", type_=sa.Text),
            claim_token=sa.bindparam("token", type_=UUID),
            locked_until=lease_end,
            next_attempt_at=lease_end,
            updated_at=_NOW,
            last_attempt_no=_attempt_numbered(t, picked.c.previous_status == _lit(Status.SENDING)),
        )
        .returning(
            d.c.delivery_id,
            d.c.last_attempt_no,
            d.c.template_id,
            d.c.idempotency_key,
            d.c.attempts,
            d.c.created_at,
            d.c.cycle_started_at,
            d.c.expires_at,
            d.c.payload_id,
            d.c.claim_token,
            d.c.locked_until,
            d.c.settled_recipients,
            picked.c.previous_status,
            picked.c.previous_worker,
            picked.c.previous_claimed_at,
            picked.c.due_at,
        )
        .cte("claimed")
    )
    lost = (
        pg.insert(t.attempts)
        .from_select(
            [
                "attempt_id",
                "delivery_id",
                "attempt_no",
                "started_at",
                "finished_at",
                "outcome",
                "error",
                "error_class",
                "worker",
            ],
            sa.select(
                new_row_id(),
                claimed.c.delivery_id,
                claimed.c.last_attempt_no,
                claimed.c.previous_claimed_at,
                _NOW,
                _lit(Outcome.LEASE_EXPIRED),
                sa.literal("the worker's lease expired before it completed the delivery"),
                sa.literal("LeaseExpired"),
                claimed.c.previous_worker,
            ).where(claimed.c.previous_status == _lit(Status.SENDING)),
        )
        .cte("lost_leases")
    )
    recipients = (
        sa.select(
            sa.func.array_agg(aggregate_order_by(r.c.address, r.c.position)).label("addresses"),
            sa.func.array_agg(aggregate_order_by(r.c.kind, r.c.position)).label("kinds"),
        )
        .where(r.c.delivery_id == claimed.c.delivery_id)
        .lateral("claimed_recipients")
    )
    # Only what ClaimedDelivery needs, in CLAIM_RESULT order: decoding the rows is a
    # large share of a worker's time. No headers (the common case) comes back as
    # NULL rather than a JSON '[]' to parse.
    empty_headers = sa.literal_column("'[]'::jsonb", pg.JSONB)
    return (
        sa.select(
            claimed.c.delivery_id,
            claimed.c.template_id,
            claimed.c.idempotency_key,
            claimed.c.attempts,
            claimed.c.created_at,
            claimed.c.cycle_started_at,
            claimed.c.expires_at,
            claimed.c.claim_token,
            claimed.c.locked_until,
            claimed.c.previous_status,
            _NOW.label("claimed_at"),
            p.c.content_type,
            p.c.subject,
            p.c.body,
            p.c.html_body,
            p.c.sender,
            sa.func.nullif(p.c.headers, empty_headers).label("headers"),
            recipients.c.addresses,
            recipients.c.kinds,
            claimed.c.settled_recipients,
        )
        .select_from(claimed)
        .join(p, p.c.payload_id == claimed.c.payload_id)
        .join(recipients, sa.true())
        .order_by(claimed.c.due_at, claimed.c.delivery_id)
        .add_cte(lost)
    )


# --- completion --------------------------------------------------------------------------

COMPLETION_ARRAYS = (
    ("delivery_id", UUID),
    ("claim_token", UUID),
    ("status", sa.Text),
    ("retry_delay", sa.Float),
    ("reason", sa.Text),
    ("outcome", sa.Text),
    ("duration", sa.Float),
    ("error", sa.Text),
    ("error_class", sa.Text),
    ("smtp_code", sa.Integer),
    ("smtp_enhanced_code", sa.Text),
    ("refused", sa.Text),
    ("worker", sa.Text),
    ("refund", sa.Integer),
    # Envelope addresses this attempt settled, one per line (addresses hold no line
    # break): NULL but for a mail retried for some of its recipients only.
    ("settled", sa.Text),
)


@functools.lru_cache(maxsize=32)
def complete_claimed(t: Tables) -> sa.Select[Any]:
    """Complete a batch of claimed deliveries, each only if its claim still holds.

    One statement per batch: set each delivery's new status (sent, retrying with
    next_attempt_at = now() + retry_delay, or dead_lettered), release the lease,
    add the recipients the attempt settled (`settled`, see DeliveryRules.after_send),
    append the attempt row (where `outcome` is not NULL) and the dead-letter
    row. The fence is `claim_token`: a worker whose lease was taken over
    changes nothing, not even the attempt history. Returns the ids that were
    completed.

    A claim token exists only while a delivery is `sending` (the claim sets it;
    completion, release and resend clear it), so the token alone is the fence.
    Testing `status = 'sending'` as well made the planner, which sees few rows
    in that state, expect one row and rescan the whole input for each delivery.
    """
    d = t.deliveries
    v = _unnest("completion_input", *COMPLETION_ARRAYS)

    def is_(status: Status) -> sa.ColumnElement[bool]:
        return v.c.status == _lit(status)

    completed = (
        sa.update(d)
        .where(
            d.c.delivery_id == v.c.delivery_id,
            # As in claim_due: by primary key, never a scan of the table.
            d.c.delivery_id == sa.func.any(_array(array_param("delivery_id"), UUID)),
            d.c.claim_token == v.c.claim_token,
        )
        .values(
            status=v.c.status,
            attempts=d.c.attempts - v.c.refund,
            next_attempt_at=sa.case(
                (is_(Status.RETRYING), _NOW + _seconds(v.c.retry_delay)), else_=sa.null()
            ),
            sent_at=sa.case((is_(Status.SENT), _NOW), else_=d.c.sent_at),
            dead_lettered_at=sa.case((is_(Status.DEAD_LETTERED), _NOW), else_=d.c.dead_lettered_at),
            last_error=v.c.reason,
            # array_cat with a NULL (nothing newly settled) leaves the array as it was.
            settled_recipients=sa.func.array_cat(
                d.c.settled_recipients,
                sa.func.string_to_array(v.c.settled, sa.literal("\n")),
            ),
            locked_by=sa.null(),
            locked_until=sa.null(),
            claim_token=sa.null(),
            updated_at=_NOW,
            last_attempt_no=_attempt_numbered(t, v.c.outcome.is_not(None)),
        )
        .returning(d.c.delivery_id, d.c.last_attempt_no)
        .cte("completed")
    )
    done = (
        sa.select(v, completed.c.last_attempt_no)
        .join(completed, completed.c.delivery_id == v.c.delivery_id)
        .cte("done")
    )
    attempts = (
        pg.insert(t.attempts)
        .from_select(
            list(ATTEMPT_COLUMNS),
            sa.select(
                new_row_id(),
                done.c.delivery_id,
                done.c.last_attempt_no,
                _NOW - _seconds(done.c.duration),
                _NOW,
                done.c.outcome,
                done.c.error,
                done.c.error_class,
                done.c.smtp_code,
                done.c.smtp_enhanced_code,
                sa.cast(done.c.refused, pg.JSONB),
                done.c.worker,
            ).where(done.c.outcome.is_not(None)),
        )
        .cte("completion_attempts")
    )
    dead_letters = (
        pg.insert(t.dead_letters)
        .from_select(
            ["dead_letter_id", "delivery_id", "archived_at", "reason"],
            sa.select(new_row_id(), done.c.delivery_id, _NOW, done.c.reason).where(
                done.c.status == _lit(Status.DEAD_LETTERED)
            ),
        )
        .cte("completion_dead_letters")
    )
    return sa.select(done.c.delivery_id).add_cte(attempts, dead_letters)


@functools.lru_cache(maxsize=32)
def release_claimed(t: Tables) -> sa.Update:
    """Give leased deliveries back untouched (a worker shutting down before sending them).

    Fenced like completion; the attempt counted at claim is handed back too.
    """
    d = t.deliveries
    return (
        sa.update(d)
        .where(
            d.c.delivery_id == sa.func.any(_array("delivery_ids", UUID)),
            d.c.claim_token == sa.bindparam("token", type_=UUID),
            d.c.status == _lit(Status.SENDING),
        )
        .values(
            status=sa.case((d.c.attempts > 1, _lit(Status.RETRYING)), else_=_lit(Status.PENDING)),
            attempts=d.c.attempts - 1,
            next_attempt_at=_NOW,
            locked_by=sa.null(),
            locked_until=sa.null(),
            claim_token=sa.null(),
            updated_at=_NOW,
        )
    )


# --- reads -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def select_delivery(t: Tables) -> sa.Select[Any]:
    """One delivery by :delivery_id."""
    d = t.deliveries
    return sa.select(*delivery_columns(t)).where(
        d.c.delivery_id == sa.bindparam("delivery_id", type_=UUID)
    )


def list_deliveries(t: Tables, *, status: Status | None, template_id: str | None) -> sa.Select[Any]:
    """A page of deliveries, newest first (:offset, :limit), optionally filtered."""
    d = t.deliveries
    return (
        sa.select(*delivery_columns(t))
        .where(*_delivery_filters(t, status, template_id))
        .order_by(d.c.created_at.desc(), d.c.delivery_id.desc())
        .offset(sa.bindparam("offset"))
        .limit(sa.bindparam("limit"))
    )


def count_deliveries(
    t: Tables, *, status: Status | None, template_id: str | None
) -> sa.Select[Any]:
    """The total behind list_deliveries."""
    return (
        sa.select(sa.func.count())
        .select_from(t.deliveries)
        .where(*_delivery_filters(t, status, template_id))
    )


def _delivery_filters(
    t: Tables, status: Status | None, template_id: str | None
) -> list[sa.ColumnElement[bool]]:
    d = t.deliveries
    filters = []
    if status is not None:
        filters.append(d.c.status == sa.bindparam("status", type_=sa.Text))
    if template_id is not None:
        filters.append(d.c.template_id == sa.bindparam("template_id", type_=sa.Text))
    return filters


@functools.lru_cache(maxsize=32)
def lock_delivery(t: Tables) -> sa.Select[Any]:
    """One delivery by :delivery_id, row-locked until the transaction ends."""
    d = t.deliveries
    return (
        sa.select(*delivery_columns(t))
        .where(d.c.delivery_id == sa.bindparam("delivery_id", type_=UUID))
        .with_for_update()
    )


@functools.lru_cache(maxsize=32)
def select_recipients(t: Tables) -> sa.Select[Any]:
    """A delivery's recipients in their stored order."""
    r = t.recipients
    return (
        sa.select(r.c.address, r.c.kind)
        .where(r.c.delivery_id == sa.bindparam("delivery_id", type_=UUID))
        .order_by(r.c.position)
    )


@functools.lru_cache(maxsize=32)
def select_payload(t: Tables) -> sa.Select[Any]:
    """A delivery's stored parts."""
    d, p = t.deliveries, t.payloads
    return (
        sa.select(p.c.content_type, p.c.subject, p.c.body, p.c.html_body, p.c.sender, p.c.headers)
        .join(d, d.c.payload_id == p.c.payload_id)
        .where(d.c.delivery_id == sa.bindparam("delivery_id", type_=UUID))
    )


@functools.lru_cache(maxsize=32)
def select_attempts(t: Tables) -> sa.Select[Any]:
    """Every attempt of a delivery, by attempt_no."""
    a = t.attempts
    return (
        sa.select(*(a.c[name] for name in ATTEMPT_COLUMNS))
        .where(a.c.delivery_id == sa.bindparam("delivery_id", type_=UUID))
        .order_by(a.c.attempt_no)
    )


@functools.lru_cache(maxsize=32)
def list_dead_letters(t: Tables) -> sa.Select[Any]:
    """A page of dead letters, newest first."""
    dl = t.dead_letters
    return (
        sa.select(dl.c.dead_letter_id, dl.c.delivery_id, dl.c.archived_at, dl.c.reason)
        .order_by(dl.c.archived_at.desc(), dl.c.dead_letter_id.desc())
        .offset(sa.bindparam("offset"))
        .limit(sa.bindparam("limit"))
    )


@functools.lru_cache(maxsize=32)
def count_dead_letters(t: Tables) -> sa.Select[Any]:
    return sa.select(sa.func.count()).select_from(t.dead_letters)


@functools.lru_cache(maxsize=32)
def count_by_status(t: Tables) -> sa.Executable:
    d = t.deliveries
    return sa.select(d.c.status, sa.func.count()).group_by(d.c.status)


@functools.lru_cache(maxsize=32)
def count_active(t: Tables) -> sa.CompoundSelect[Any]:
    """(status, count) of the deliveries a worker may still act on: pending, retrying, sending.

    Each part matches a partial index's predicate (the due index, the leased
    index), so the count costs the backlog, not the history: count_by_status
    reads the whole table, sent mail included.
    """
    d = t.deliveries

    def counted(where: sa.ColumnElement[bool]) -> sa.Select[Any]:
        return sa.select(d.c.status, sa.func.count()).where(where).group_by(d.c.status)

    return sa.union_all(
        counted(_status_in(d.c.status, WAITING_STATUSES)),
        counted(d.c.status == _lit(Status.SENDING)),
    )


@functools.lru_cache(maxsize=32)
def select_queue_health(t: Tables) -> sa.Select[Any]:
    """Age in seconds of the oldest due delivery (0 when none), and leases in flight.

    Due is what `claim_due` would take: a waiting row whose time has come, or a
    leased row whose lease ran out (its worker died or hung; its
    next_attempt_at is the lease end). Each part reads only its partial index,
    so a scrape costs the same with a million sent rows in the table as with none.
    """
    d = t.deliveries

    def oldest(*where: sa.ColumnElement[bool]) -> sa.ScalarSelect[Any]:
        return (
            sa.select(sa.func.min(d.c.next_attempt_at))
            .where(*where, d.c.next_attempt_at <= _NOW)
            .scalar_subquery()
        )

    leased = d.c.status == _lit(Status.SENDING)
    oldest_due = sa.func.least(oldest(_status_in(d.c.status, WAITING_STATUSES)), oldest(leased))
    return sa.select(
        sa.func.coalesce(sa.extract("epoch", _NOW - oldest_due), 0).label("oldest_due_seconds"),
        sa.select(sa.func.count()).where(leased).scalar_subquery().label("leased"),
    )


# --- operator actions ---------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def resend_unless_sent_or_sending(t: Tables) -> sa.Update:
    """Re-arm a delivery for a new cycle: pending now, attempts 0, no expiry, no lease.

    The status guard makes the database the arbiter when resend races a worker:
    a delivery in flight (sending) or already sent is left alone, and the
    caller reads the row to say why. attempt history is kept, and so are the
    settled recipients: a resent mail goes only to those it has not reached.
    """
    d = t.deliveries
    return (
        sa.update(d)
        .where(
            d.c.delivery_id == sa.bindparam("target_id", type_=UUID),
            d.c.status.not_in([_lit(Status.SENT), _lit(Status.SENDING)]),
        )
        .values(
            status=_lit(Status.PENDING),
            attempts=0,
            next_attempt_at=_NOW,
            dead_lettered_at=sa.null(),
            expires_at=sa.null(),
            cycle_started_at=_NOW,
            last_error="",
            locked_by=sa.null(),
            locked_until=sa.null(),
            claim_token=sa.null(),
            updated_at=_NOW,
        )
        .returning(*delivery_columns(t))
    )


@functools.lru_cache(maxsize=32)
def cancel_if_waiting(t: Tables) -> sa.Update:
    """Cancel a delivery that is pending or retrying (not one in flight or finished)."""
    d = t.deliveries
    return (
        sa.update(d)
        .where(
            d.c.delivery_id == sa.bindparam("target_id", type_=UUID),
            _status_in(d.c.status, (Status.PENDING, Status.RETRYING)),
        )
        .values(status=_lit(Status.CANCELLED), next_attempt_at=sa.null(), updated_at=_NOW)
        .returning(*delivery_columns(t))
    )


@functools.lru_cache(maxsize=32)
def notify_due(t: Tables) -> sa.Select[Any]:
    """Wake listening workers (delivered when the transaction commits)."""
    return sa.select(sa.func.pg_notify(sa.literal(t.notify_channel), sa.literal("")))


@functools.lru_cache(maxsize=32)
def purge_terminal_batch(t: Tables) -> sa.Select[Any]:
    """Delete up to :batch terminal deliveries last updated more than :age_seconds ago.

    Their recipients, attempts and dead letters go by ON DELETE CASCADE and their
    payloads in the same statement. SKIP LOCKED keeps purge out of the way of
    anything else touching those rows. Returns how many deliveries went.
    """
    d, p = t.deliveries, t.payloads
    doomed = (
        sa.select(d.c.delivery_id)
        .where(
            _status_in(d.c.status, TERMINAL_STATUSES),
            d.c.updated_at < _NOW - _seconds(sa.bindparam("age_seconds", type_=sa.Float)),
        )
        .limit(sa.bindparam("batch"))
        .with_for_update(skip_locked=True)
        .cte("doomed")
    )
    gone = (
        sa.delete(d)
        .where(d.c.delivery_id == doomed.c.delivery_id)
        .returning(d.c.payload_id)
        .cte("gone_deliveries")
    )
    payloads = sa.delete(p).where(p.c.payload_id == gone.c.payload_id).cte("gone_payloads")
    return sa.select(sa.func.count()).select_from(gone).add_cte(payloads)
