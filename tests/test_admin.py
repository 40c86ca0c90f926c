"""Reading and repairing the outbox: get, list, count, resend, cancel, purge."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

import mailoutbox
from mailoutbox import (
    DeliveryNotFound,
    InvalidTransition,
    Outbox,
    Outcome,
    ResendOnSent,
    SchemaNotMigrated,
    Status,
)
from mailoutbox.records import AttemptRecord, Completion
from mailoutbox.store import Store

from .factories import make_mail, row_counts
from .test_store_claim import claim, complete, expire_leases


def finish(
    engine: sa.Engine, outbox: Outbox, status: Status, outcome: Outcome, reason: str = ""
) -> uuid.UUID:
    """Enqueue one mail and take it through one attempt to `status`."""
    enq = outbox.enqueue(make_mail())
    [c] = claim(engine, outbox)
    complete(
        engine,
        outbox,
        Completion(c.delivery_id, c.claim_token, status, AttemptRecord(outcome), 0.0, reason),
    )
    return enq.delivery_id


def age_everything(engine: sa.Engine, days: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"UPDATE mailoutbox.mail_deliveries SET updated_at = now() - interval '{days} days'"
            )
        )


def test_get_unknown_delivery_raises_delivery_not_found(outbox: Outbox) -> None:
    """Unknown and malformed ids raise DeliveryNotFound."""
    with pytest.raises(DeliveryNotFound):
        outbox.get_delivery(uuid.uuid4())
    with pytest.raises(DeliveryNotFound):
        outbox.get_delivery("not-a-uuid")
    with pytest.raises(DeliveryNotFound):
        outbox.list_attempts(uuid.uuid4())


def test_get_delivery_accepts_the_id_as_text(outbox: Outbox) -> None:
    """An id copied from a log line works as well as a UUID."""
    enq = outbox.enqueue(make_mail())
    assert outbox.get_delivery(str(enq.delivery_id)).delivery_id == enq.delivery_id


def test_list_deliveries_is_newest_first_with_total(outbox: Outbox) -> None:
    """Pages run newest first and carry the total row count."""
    ids = [outbox.enqueue(make_mail()).delivery_id for _ in range(5)]
    page = outbox.list_deliveries(offset=0, limit=2)
    assert page.total == 5
    assert [d.delivery_id for d in page.items] == ids[::-1][:2]
    rest = outbox.list_deliveries(offset=2, limit=10)
    assert [d.delivery_id for d in rest.items] == ids[::-1][2:]
    assert outbox.list_deliveries(offset=10).items == []


def test_list_deliveries_filters_by_status_and_template(engine: sa.Engine, outbox: Outbox) -> None:
    """The status filter and the template filter narrow items and total alike."""
    sent_id = finish(engine, outbox, Status.SENT, Outcome.SENT)
    outbox.enqueue(make_mail(template_id="receipt"))
    outbox.enqueue(make_mail(template_id="receipt"))
    page = outbox.list_deliveries(status=Status.SENT)
    assert page.total == 1 and page.items[0].delivery_id == sent_id
    assert outbox.list_deliveries(status="pending").total == 2
    assert outbox.list_deliveries(template_id="receipt").total == 2
    assert outbox.list_deliveries(status="pending", template_id="welcome").total == 0


def test_list_deliveries_rejects_bad_paging(outbox: Outbox) -> None:
    """Negative offsets, zero or huge limits and unknown statuses are ValueErrors."""
    for kwargs in (
        {"offset": -1},
        {"offset": 2**63},
        {"offset": True},
        {"limit": 0},
        {"limit": 100_000},
        {"limit": True},
        {"status": "lost"},
    ):
        with pytest.raises(ValueError):
            outbox.list_deliveries(**kwargs)
        if "status" not in kwargs:
            with pytest.raises(ValueError):
                outbox.list_dead_letters(**kwargs)


def test_purge_rejects_ages_and_batches_the_database_cannot_take(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """A typed error up front, nothing deleted; not a DataError from the database."""
    finish(engine, outbox, Status.SENT, Outcome.SENT)
    for older_than, batch_size in (
        (timedelta(days=-1), 10),
        (timedelta(days=365 * 10_000), 10),
        (timedelta(days=999_999_999), 10),
        (timedelta(0), 0),
        (timedelta(0), 10**19),
        (timedelta(0), True),
    ):
        with pytest.raises(ValueError):
            outbox.purge(older_than, batch_size=batch_size)
    assert row_counts(engine)["mail_deliveries"] == 1


def test_count_by_status_includes_every_state(engine: sa.Engine, outbox: Outbox) -> None:
    """Every state is a key, zeros included."""
    assert outbox.count_by_status() == {s: 0 for s in Status}
    finish(engine, outbox, Status.DEAD_LETTERED, Outcome.PERMANENT_FAILURE, "550")
    outbox.enqueue(make_mail())
    counts = outbox.count_by_status()
    assert set(counts) == set(Status)
    assert counts[Status.PENDING] == 1 and counts[Status.DEAD_LETTERED] == 1
    assert sum(counts.values()) == 2


def test_count_active_gives_the_three_states_a_worker_acts_on(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """Pending, retrying and sending, as count_by_status counts them; finished mail is
    not read (metrics count it once a minute)."""
    from mailoutbox.schema import ACTIVE_STATUSES

    assert outbox.count_active() == dict.fromkeys(ACTIVE_STATUSES, 0)
    finish(engine, outbox, Status.DEAD_LETTERED, Outcome.PERMANENT_FAILURE, "550")
    finish(engine, outbox, Status.RETRYING, Outcome.TRANSIENT_FAILURE, "451")
    outbox.enqueue_many([make_mail() for _ in range(3)])
    claim(engine, outbox, limit=1)
    counts = outbox.count_by_status()
    assert outbox.count_active() == {status: counts[status] for status in ACTIVE_STATUSES}
    # The claim took one of the four waiting mails, perhaps the retry (due at once).
    assert counts[Status.SENDING] == 1
    assert counts[Status.PENDING] + counts[Status.RETRYING] == 3 and counts[Status.PENDING] >= 2


def test_queue_health_counts_an_expired_lease_as_due(engine: sa.Engine, outbox: Outbox) -> None:
    """Mail a dead worker left leased is due (the next claim takes it first), so the oldest
    due age, what the README says to alert on, must grow while it waits; a live lease is
    in flight but not due."""
    assert outbox.queue_health() == (0.0, 0)
    outbox.enqueue_many([make_mail(), make_mail()])
    claim(engine, outbox, worker="alive", lease=60.0)
    assert outbox.queue_health() == (0.0, 2)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE mailoutbox.mail_deliveries SET"
                " locked_until = now() - interval '90 seconds',"
                " next_attempt_at = now() - interval '90 seconds'"
            )
        )
    oldest, leased = outbox.queue_health()
    assert 90 <= oldest < 120
    assert leased == 2


def test_resend_rearms_a_dead_letter_and_keeps_history(engine: sa.Engine, outbox: Outbox) -> None:
    """Resend makes a dead letter pending again with attempts reset; attempt_no keeps counting."""
    delivery_id = finish(engine, outbox, Status.DEAD_LETTERED, Outcome.PERMANENT_FAILURE, "550")
    resent = outbox.resend(delivery_id)
    assert resent.status is Status.PENDING
    assert resent.attempts == 0
    assert resent.dead_lettered_at is None and resent.last_error == ""
    [c] = claim(engine, outbox)
    assert c.delivery_id == delivery_id and c.attempts == 1
    complete(
        engine,
        outbox,
        Completion(c.delivery_id, c.claim_token, Status.SENT, AttemptRecord(Outcome.SENT)),
    )
    attempts = outbox.list_attempts(delivery_id)
    assert [a.attempt_no for a in attempts] == [1, 2]
    assert [a.outcome for a in attempts] == [Outcome.PERMANENT_FAILURE, Outcome.SENT]


def test_resend_of_sent_delivery_raises_resend_on_sent(engine: sa.Engine, outbox: Outbox) -> None:
    """A sent delivery is never re-armed."""
    delivery_id = finish(engine, outbox, Status.SENT, Outcome.SENT)
    with pytest.raises(ResendOnSent):
        outbox.resend(delivery_id)
    assert outbox.get_delivery(delivery_id).status is Status.SENT


def test_resend_of_delivery_in_flight_is_refused(engine: sa.Engine, outbox: Outbox) -> None:
    """A delivery a worker holds is left alone; the error names its state."""
    enq = outbox.enqueue(make_mail())
    claim(engine, outbox)
    with pytest.raises(InvalidTransition) as excinfo:
        outbox.resend(enq.delivery_id)
    assert excinfo.value.status == "sending"
    assert not isinstance(excinfo.value, ResendOnSent)


def test_resend_unknown_delivery_raises_not_found(outbox: Outbox) -> None:
    """Resend of an id that does not exist raises DeliveryNotFound."""
    with pytest.raises(DeliveryNotFound):
        outbox.resend(uuid.uuid4())


def test_resend_clears_expiry(engine: sa.Engine, outbox: Outbox) -> None:
    """An expired mail that an operator resends is sent, not expired again."""
    from datetime import datetime, timezone

    enq = outbox.enqueue(make_mail(expires_at=datetime.now(timezone.utc) + timedelta(hours=1)))
    outbox.cancel(enq.delivery_id)
    assert outbox.resend(enq.delivery_id).expires_at is None


def test_cancel_pending_delivery_stops_it(engine: sa.Engine, outbox: Outbox) -> None:
    """A cancelled delivery is never claimed."""
    enq = outbox.enqueue(make_mail())
    cancelled = outbox.cancel(enq.delivery_id)
    assert cancelled.status is Status.CANCELLED and cancelled.next_attempt_at is None
    assert claim(engine, outbox) == []


def test_cancel_of_sent_or_sending_is_refused(engine: sa.Engine, outbox: Outbox) -> None:
    """Only waiting deliveries can be cancelled."""
    sent_id = finish(engine, outbox, Status.SENT, Outcome.SENT)
    with pytest.raises(InvalidTransition):
        outbox.cancel(sent_id)
    enq = outbox.enqueue(make_mail())
    claim(engine, outbox)
    with pytest.raises(InvalidTransition):
        outbox.cancel(enq.delivery_id)
    with pytest.raises(DeliveryNotFound):
        outbox.cancel(uuid.uuid4())


def test_purge_removes_old_terminal_deliveries_with_their_rows(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """purge deletes old sent/dead-lettered/cancelled deliveries and everything hanging off them."""
    finish(engine, outbox, Status.SENT, Outcome.SENT)
    finish(engine, outbox, Status.DEAD_LETTERED, Outcome.PERMANENT_FAILURE, "550")
    outbox.cancel(outbox.enqueue(make_mail()).delivery_id)
    age_everything(engine, 40)
    recent = finish(engine, outbox, Status.SENT, Outcome.SENT)
    waiting = outbox.enqueue(make_mail(cc=["c@example.com"])).delivery_id
    assert outbox.purge(older_than=timedelta(days=30), batch_size=2) == 3
    remaining = {d.delivery_id for d in outbox.list_deliveries().items}
    assert remaining == {waiting, recent}
    counts = row_counts(engine)
    assert counts == {
        "mail_deliveries": 2,
        "mail_payloads": 2,
        "mail_recipients": 3,
        "mail_attempts": 1,
        "mail_dead_letters": 0,
    }


def test_purge_never_touches_active_deliveries(engine: sa.Engine, outbox: Outbox) -> None:
    """Pending, retrying and sending rows survive any purge, however old."""
    outbox.enqueue(make_mail())
    outbox.enqueue(make_mail())
    claim(engine, outbox, limit=1)
    age_everything(engine, 400)
    assert outbox.purge(older_than=timedelta(0)) == 0
    assert row_counts(engine)["mail_deliveries"] == 2


def test_lease_expiry_attempt_and_resend_numbering(engine: sa.Engine, outbox: Outbox) -> None:
    """attempt_no stays monotonic through a lost lease, a dead letter and a resend."""
    enq = outbox.enqueue(make_mail())
    claim(engine, outbox)
    expire_leases(engine)
    [c] = claim(engine, outbox)
    complete(
        engine,
        outbox,
        Completion(
            c.delivery_id,
            c.claim_token,
            Status.DEAD_LETTERED,
            AttemptRecord(Outcome.PERMANENT_FAILURE),
            reason="550",
        ),
    )
    outbox.resend(enq.delivery_id)
    [c] = claim(engine, outbox)
    complete(
        engine,
        outbox,
        Completion(c.delivery_id, c.claim_token, Status.SENT, AttemptRecord(Outcome.SENT)),
    )
    assert [a.attempt_no for a in outbox.list_attempts(enq.delivery_id)] == [1, 2, 3]


def test_unmigrated_database_raises_schema_not_migrated(empty_db_url: sa.URL) -> None:
    """Using an outbox before migrating says so, instead of a raw SQL error."""
    engine = sa.create_engine(empty_db_url)
    try:
        outbox = Outbox(engine, default_sender="a@example.com")
        with pytest.raises(SchemaNotMigrated):
            outbox.enqueue(make_mail())
        with pytest.raises(SchemaNotMigrated):
            outbox.count_by_status()
    finally:
        engine.dispose()


def test_a_schema_a_migration_behind_raises_schema_not_migrated(empty_db_url: sa.URL) -> None:
    """Application code deployed before `mailoutbox migrate` ran: reads, cancel and resend
    said "column ... does not exist" (psycopg's UndefinedColumn), not what to do."""
    engine = sa.create_engine(empty_db_url)
    try:
        mailoutbox.migrate(engine, revision="0004")
        outbox = Outbox(engine, default_sender="a@example.com")
        enq = outbox.enqueue(make_mail())
        for call in (outbox.get_delivery, outbox.cancel, outbox.resend):
            with pytest.raises(SchemaNotMigrated, match=r"behind this release.*migrate"):
                call(enq.delivery_id)
        with pytest.raises(SchemaNotMigrated):
            outbox.list_deliveries()
    finally:
        engine.dispose()


def test_a_claim_token_exists_exactly_while_a_delivery_is_sending(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """Completion is fenced by the claim token alone: every transition must keep this true."""
    sent = finish(engine, outbox, Status.SENT, Outcome.SENT)
    dead = finish(engine, outbox, Status.DEAD_LETTERED, Outcome.PERMANENT_FAILURE, "550 no")
    outbox.enqueue_many([make_mail(), make_mail()])
    released, in_flight = claim(engine, outbox)
    retrying = finish(engine, outbox, Status.RETRYING, Outcome.TRANSIENT_FAILURE, "451 later")
    with engine.begin() as conn:
        assert Store().release(conn, [released.delivery_id], released.claim_token) == 1
    outbox.resend(dead)
    outbox.cancel(retrying)
    with engine.connect() as conn:
        rows: dict[uuid.UUID, str] = dict(
            conn.execute(
                sa.text("SELECT delivery_id, status FROM mailoutbox.mail_deliveries")
            ).all()
        )
        mismatched = conn.execute(
            sa.text(
                "SELECT count(*) FROM mailoutbox.mail_deliveries"
                " WHERE (claim_token IS NOT NULL) <> (status = 'sending')"
            )
        ).scalar_one()
    assert rows[sent] == "sent" and rows[dead] == "pending" and rows[retrying] == "cancelled"
    assert rows[released.delivery_id] == "pending" and rows[in_flight.delivery_id] == "sending"
    assert mismatched == 0
