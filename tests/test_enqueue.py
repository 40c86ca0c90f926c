"""Transactional enqueue against real PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from mailoutbox import Enqueued, InvalidMail, Kind, Mail, Outbox, Status

from .factories import make_mail, row_counts


@pytest.fixture
def orders(engine: sa.Engine) -> sa.Table:
    """A host application's own table, written in the same transactions as the mail."""
    md = sa.MetaData()
    table = sa.Table("orders", md, sa.Column("id", sa.Integer, primary_key=True))
    md.create_all(engine)
    return table


def test_enqueue_without_connection_commits_its_own_transaction(outbox: Outbox) -> None:
    """enqueue() with no connection is visible at once, pending and due now."""
    result = outbox.enqueue(make_mail())
    assert result.created
    delivery = outbox.get_delivery(result.delivery_id)
    assert delivery.status is Status.PENDING
    assert delivery.attempts == 0
    assert delivery.next_attempt_at is not None
    assert delivery.next_attempt_at <= datetime.now(timezone.utc) + timedelta(seconds=5)


def test_enqueue_stores_recipients_in_order_with_kinds(outbox: Outbox) -> None:
    """to, cc and bcc recipients are stored with their kind, in the order given."""
    result = outbox.enqueue(
        make_mail(
            to=["a@example.com", "Bee <b@example.com>"], cc=["c@example.com"], bcc=["d@example.com"]
        )
    )
    recipients = outbox.list_recipients(result.delivery_id)
    assert [(r.address, r.kind) for r in recipients] == [
        ("a@example.com", Kind.TO),
        ("Bee <b@example.com>", Kind.TO),
        ("c@example.com", Kind.CC),
        ("d@example.com", Kind.BCC),
    ]


def test_enqueue_stores_parts_not_a_rendered_message(outbox: Outbox) -> None:
    """The payload keeps subject, text, html, sender and headers apart for rendering later."""
    result = outbox.enqueue(
        make_mail(
            subject="Grüße",
            text="plain ✓",
            html="<p>html ✓</p>",
            reply_to=["help@example.com"],
            headers={"X-Campaign": "spring"},
        )
    )
    payload = outbox.get_payload(result.delivery_id)
    assert payload.content_type == "multipart/alternative"
    assert payload.subject == "Grüße"
    assert payload.body.decode() == "plain ✓"
    assert payload.html_body == "<p>html ✓</p>"
    assert payload.sender == "Shop <noreply@example.com>"
    assert list(payload.headers) == [("Reply-To", "help@example.com"), ("X-Campaign", "spring")]


def test_enqueue_on_callers_connection_commits_with_the_caller(
    engine: sa.Engine, sync_outbox: Outbox, orders: sa.Table
) -> None:
    """Mail and business row become visible together when the caller commits."""
    outbox = sync_outbox
    with engine.begin() as conn:
        conn.execute(orders.insert().values(id=1))
        result = outbox.enqueue(make_mail(), connection=conn)
        with engine.connect() as other:
            assert outbox.store.get_delivery(other, result.delivery_id) is None
    assert outbox.get_delivery(result.delivery_id).status is Status.PENDING


def test_rolled_back_caller_transaction_leaves_no_mail(
    engine: sa.Engine, sync_outbox: Outbox, orders: sa.Table
) -> None:
    """If the caller rolls back, no delivery, payload or recipient exists."""
    outbox = sync_outbox
    conn = engine.connect()
    trans = conn.begin()
    conn.execute(orders.insert().values(id=1))
    outbox.enqueue_many([make_mail(), make_mail()], connection=conn)
    trans.rollback()
    conn.close()
    assert set(row_counts(engine).values()) == {0}


def test_enqueue_joins_an_orm_session_transaction(
    engine: sa.Engine, sync_outbox: Outbox, orders: sa.Table
) -> None:
    """A Session can be passed as the connection; its commit or rollback decides."""
    outbox = sync_outbox
    with Session(engine) as session:
        session.execute(orders.insert().values(id=1))
        kept = outbox.enqueue(make_mail(), connection=session)
        session.commit()
    with Session(engine) as session:
        outbox.enqueue(make_mail(), connection=session)
        session.rollback()
    assert outbox.count_by_status()[Status.PENDING] == 1
    assert outbox.get_delivery(kept.delivery_id).status is Status.PENDING


def test_duplicate_returns_existing_id_and_leaves_no_orphans(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """A second enqueue of the same key returns the first id, created=False, writing nothing."""
    first = outbox.enqueue(make_mail(idempotency_key="order-1"))
    before = row_counts(engine)
    second = outbox.enqueue(make_mail(idempotency_key="order-1", to=["other@example.com"]))
    assert second.delivery_id == first.delivery_id
    assert not second.created
    assert row_counts(engine) == before


def test_duplicate_keeps_callers_transaction_usable(
    engine: sa.Engine, sync_outbox: Outbox, orders: sa.Table
) -> None:
    """After a duplicate enqueue the caller's other writes still commit."""
    outbox = sync_outbox
    outbox.enqueue(make_mail(idempotency_key="order-1"))
    with engine.begin() as conn:
        dup = outbox.enqueue(make_mail(idempotency_key="order-1"), connection=conn)
        conn.execute(orders.insert().values(id=7))
    assert not dup.created
    with engine.connect() as conn:
        assert conn.execute(sa.select(orders.c.id)).scalars().all() == [7]


def test_same_key_under_another_template_is_a_different_mail(outbox: Outbox) -> None:
    """Idempotency is per (template_id, idempotency_key)."""
    a = outbox.enqueue(make_mail(template_id="welcome", idempotency_key="k"))
    b = outbox.enqueue(make_mail(template_id="receipt", idempotency_key="k"))
    assert a.created and b.created and a.delivery_id != b.delivery_id


def test_enqueue_many_returns_results_in_input_order(outbox: Outbox) -> None:
    """enqueue_many answers one Enqueued per mail, in input order, dups included."""
    existing = outbox.enqueue(make_mail(idempotency_key="old"))
    mails = [make_mail(idempotency_key=k) for k in ("n1", "old", "n2", "n1")]
    results = outbox.enqueue_many(mails)
    assert [r.created for r in results] == [True, False, True, False]
    assert results[1].delivery_id == existing.delivery_id
    assert results[3].delivery_id == results[0].delivery_id
    for mail, result in zip(mails, results, strict=False):
        assert outbox.get_delivery(result.delivery_id).idempotency_key == mail.idempotency_key


def test_enqueue_many_duplicates_leave_no_orphans(engine: sa.Engine, outbox: Outbox) -> None:
    """Duplicates inside a batch write no payload or recipient rows of their own."""
    outbox.enqueue_many([make_mail(idempotency_key="a", cc=["c@example.com"])] * 3)
    counts = row_counts(engine)
    assert counts["mail_deliveries"] == 1
    assert counts["mail_payloads"] == 1
    assert counts["mail_recipients"] == 2


def test_enqueue_many_is_one_statement_per_batch(engine: sa.Engine, sync_outbox: Outbox) -> None:
    """A batch of new mails costs one statement, whatever its size."""
    outbox = sync_outbox
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(statement)

    mails = [make_mail(cc=["c@example.com"]) for _ in range(250)]
    with engine.begin() as conn:
        sa.event.listen(conn, "before_cursor_execute", record)
        outbox.enqueue_many(mails, connection=conn)
        sa.event.remove(conn, "before_cursor_execute", record)
    assert len(statements) == 1
    assert outbox.count_by_status()[Status.PENDING] == 250


def test_enqueue_many_with_no_mails_writes_nothing(engine: sa.Engine, outbox: Outbox) -> None:
    """An empty batch is a no-op."""
    assert outbox.enqueue_many([]) == []
    assert set(row_counts(engine).values()) == {0}


def test_invalid_mail_in_batch_writes_nothing_and_keeps_transaction(
    engine: sa.Engine, sync_outbox: Outbox, orders: sa.Table
) -> None:
    """One invalid mail rejects the batch before any write; the caller can carry on."""
    outbox = sync_outbox
    with engine.begin() as conn:
        with pytest.raises(InvalidMail):
            outbox.enqueue_many([make_mail(), make_mail(to=["not an address"])], connection=conn)
        conn.execute(orders.insert().values(id=1))
    counts = row_counts(engine)
    assert counts["mail_deliveries"] == 0
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one() == 1


def test_send_at_sets_the_first_attempt_time(outbox: Outbox) -> None:
    """A future send_at becomes next_attempt_at; expires_at is stored."""
    send_at = datetime.now(timezone.utc) + timedelta(hours=3)
    expires_at = send_at + timedelta(days=1)
    result = outbox.enqueue(make_mail(send_at=send_at, expires_at=expires_at))
    delivery = outbox.get_delivery(result.delivery_id)
    assert delivery.next_attempt_at == send_at
    assert delivery.expires_at == expires_at


def test_mail_without_sender_uses_default_sender(engine: sa.Engine) -> None:
    """An outbox without default_sender refuses a mail without sender."""
    bare = Outbox(engine)
    with pytest.raises(InvalidMail) as excinfo:
        bare.enqueue(make_mail())
    assert excinfo.value.field == "sender"
    assert bare.enqueue(make_mail(sender="me@example.com")).created


def test_payload_size_limit_is_configurable(engine: sa.Engine, outbox: Outbox) -> None:
    """max_payload_bytes bounds the stored parts; over it is InvalidMail, nothing written."""
    small = Outbox(engine, default_sender="a@example.com", max_payload_bytes=1000)
    with pytest.raises(InvalidMail):
        small.enqueue(make_mail(text="x" * 2000))
    assert row_counts(engine)["mail_payloads"] == 0
    assert outbox.enqueue(make_mail(text="x" * 2000)).created


def _race(engine: sa.Engine, outbox: Outbox, workers: int, body: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(workers)
    results: list[Any] = [None] * workers
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = body(i)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_sixteen_threads_enqueueing_one_key_create_one_delivery(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """Concurrent enqueues of one key: exactly one delivery, every caller gets its id."""
    results = _race(engine, outbox, 16, lambda i: outbox.enqueue(make_mail(idempotency_key="race")))
    assert len({r.delivery_id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert row_counts(engine)["mail_deliveries"] == 1
    assert row_counts(engine)["mail_payloads"] == 1


def test_rolled_back_first_inserter_lets_the_next_create(
    engine: sa.Engine, sync_outbox: Outbox
) -> None:
    """If the transaction that inserted a key first rolls back, a waiting enqueue creates it."""
    outbox = sync_outbox
    first = engine.connect()
    trans = first.begin()
    doomed = outbox.enqueue(make_mail(idempotency_key="k"), connection=first)
    assert doomed.created
    outcome: list[Enqueued] = []
    waiter = threading.Thread(
        target=lambda: outcome.append(outbox.enqueue(make_mail(idempotency_key="k")))
    )
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive(), "the second enqueue should wait for the first transaction"
    trans.rollback()
    first.close()
    waiter.join(timeout=10)
    assert outcome and outcome[0].created
    assert outcome[0].delivery_id != doomed.delivery_id
    assert outbox.get_delivery(outcome[0].delivery_id).status is Status.PENDING


def test_sixteen_threads_with_rollbacks_leave_exactly_committed_keys(
    engine: sa.Engine, sync_outbox: Outbox
) -> None:
    """Racing enqueues where half roll back: one delivery, owned by a committed caller."""
    outbox = sync_outbox

    def body(i: int) -> uuid.UUID | None:
        with engine.connect() as conn:
            trans = conn.begin()
            result = outbox.enqueue(make_mail(idempotency_key="mixed"), connection=conn)
            if i % 2:
                trans.rollback()
                return None
            trans.commit()
            return result.delivery_id

    results = _race(engine, outbox, 16, body)
    committed = {r for r in results if r is not None}
    assert len(committed) == 1
    assert row_counts(engine)["mail_deliveries"] == 1
    assert outbox.get_delivery(committed.pop()).idempotency_key == "mixed"


def test_from_message_stores_the_mime_body(outbox: Outbox) -> None:
    """Mail.from_message keeps the caller's MIME structure and takes the envelope from headers."""
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"] = "Billing <billing@example.com>"
    msg["To"] = "alice@example.com"
    msg["Bcc"] = "audit@example.com"
    msg["Subject"] = "Invoice"
    msg.set_content("See attached.")
    msg.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename="inv.pdf")
    result = outbox.enqueue(Mail.from_message(msg, template_id="invoice", idempotency_key="i-1"))
    payload = outbox.get_payload(result.delivery_id)
    assert payload.content_type == "message/rfc822"
    assert payload.sender == "Billing <billing@example.com>"
    assert b"inv.pdf" in payload.body
    assert b"audit@example.com" not in payload.body
    kinds = {(r.address, r.kind) for r in outbox.list_recipients(result.delivery_id)}
    assert kinds == {("alice@example.com", Kind.TO), ("audit@example.com", Kind.BCC)}


def test_non_ascii_display_names_are_stored_readable(outbox: Outbox) -> None:
    """An operator reads 'Zoë Müller', not RFC 2047 words; encoding happens at send time."""
    result = outbox.enqueue(make_mail(to=["Zoë Müller <zoe@example.com>"]))
    [recipient] = outbox.list_recipients(result.delivery_id)
    assert recipient.address == "Zoë Müller <zoe@example.com>"


@pytest.mark.parametrize("batch", [False, True], ids=["enqueue", "enqueue_many"])
def test_a_duplicate_whose_delivery_is_purged_mid_enqueue_is_enqueued_anew(
    engine: sa.Engine, sync_outbox: Outbox, batch: bool
) -> None:
    """The insert meets an old, finished delivery with the same key; a purge in another
    session deletes it before the enqueue looks its id up. The key is free again: the
    mail is enqueued anew (it was a bare KeyError)."""
    first = sync_outbox.enqueue(make_mail(idempotency_key="K")).delivery_id
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE mailoutbox.mail_deliveries SET status = 'sent', sent_at = now(),"
                " updated_at = now() - interval '40 days'"
            )
        )
    purged: list[int] = []

    def purge_between(conn: sa.Connection, cursor: Any, statement: str, *args: Any) -> None:
        if "ON CONFLICT" in statement and not purged:
            purged.append(sync_outbox.purge(timedelta(days=30)))

    mails = [make_mail(idempotency_key="K")] + ([make_mail()] if batch else [])
    with engine.connect() as conn:
        sa.event.listen(conn, "after_cursor_execute", purge_between)
        with conn.begin():
            results = sync_outbox.enqueue_many(mails, connection=conn)
    assert purged == [1]
    assert all(r.created for r in results)
    assert results[0].delivery_id != first
    assert sync_outbox.get_delivery(results[0].delivery_id).status is Status.PENDING
    assert sync_outbox.count_by_status()[Status.PENDING] == len(mails)


def test_a_key_too_long_in_bytes_is_refused_before_it_can_abort_the_callers_transaction(
    engine: sa.Engine, sync_outbox: Outbox, orders: sa.Table
) -> None:
    """Keys are limited in UTF-8 bytes, which the database's unique index counts: 1,000
    CJK characters (3,000 bytes) passed a limit in characters, then failed in the
    INSERT and aborted the caller's transaction. Now InvalidMail, and the order commits."""
    with engine.begin() as conn:
        conn.execute(orders.insert().values(id=1))
        with pytest.raises(InvalidMail) as info:
            sync_outbox.enqueue(make_mail(idempotency_key="鍵" * 1000), connection=conn)
        assert info.value.field == "idempotency_key"
        with pytest.raises(InvalidMail):
            sync_outbox.enqueue_many(
                [make_mail(), make_mail(template_id="型" * 334)], connection=conn
            )
        fits = sync_outbox.enqueue(make_mail(idempotency_key="鍵" * 333), connection=conn)
    assert fits.created
    assert row_counts(engine)["mail_deliveries"] == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one() == 1


def test_an_outbox_on_another_driver_is_refused_when_it_is_made() -> None:
    """Every statement is written for psycopg 3; another driver failed at the first
    enqueue, asyncpg's with "'NoneType' object has no attribute 'format'"."""
    engine = sa.create_engine("sqlite://")
    try:
        with pytest.raises(TypeError, match=r"psycopg \(3\).*not sqlite\+pysqlite"):
            Outbox(engine)
    finally:
        engine.dispose()
