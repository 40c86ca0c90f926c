"""The store operations the worker consumes: claim, complete, release."""

from __future__ import annotations

import threading
import uuid

import pytest
import sqlalchemy as sa

from mailoutbox import Outbox, Outcome, Status
from mailoutbox.records import AttemptRecord, ClaimedDelivery, Completion

from .factories import make_mail, row_counts


@pytest.fixture
def outbox(sync_outbox: Outbox) -> Outbox:
    """Store-level tests drive the sync store; the async store runs the same plans."""
    return sync_outbox


def claim(
    engine: sa.Engine,
    outbox: Outbox,
    limit: int = 100,
    worker: str = "w1",
    lease: float = 60.0,
    exclude: tuple[uuid.UUID, ...] = (),
) -> list[ClaimedDelivery]:
    with engine.begin() as conn:
        return outbox.store.claim_due(
            conn, limit=limit, worker=worker, lease_seconds=lease, exclude=exclude
        )


def complete(engine: sa.Engine, outbox: Outbox, *completions: Completion) -> set[uuid.UUID]:
    with engine.begin() as conn:
        return outbox.store.complete(conn, completions)


def expire_leases(engine: sa.Engine) -> None:
    """Move every lease into the past, as if its time had run out."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE mailoutbox.mail_deliveries SET locked_until = now() - interval '1 second',"
                " next_attempt_at = now() - interval '1 second' WHERE status = 'sending'"
            )
        )


def sent(c: ClaimedDelivery) -> Completion:
    return Completion(
        c.delivery_id, c.claim_token, Status.SENT, AttemptRecord(Outcome.SENT, 0.2), worker="w1"
    )


def test_claim_leases_due_rows_with_payload_and_recipients(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """A claim returns each row ready to send and marks it sending under a lease."""
    enq = outbox.enqueue(make_mail(to=["a@example.com"], bcc=["b@example.com"], subject="S"))
    [claimed] = claim(engine, outbox, worker="worker-7", lease=120)
    assert claimed.delivery_id == enq.delivery_id
    assert claimed.payload.subject == "S"
    assert [r.address for r in claimed.recipients] == ["a@example.com", "b@example.com"]
    assert claimed.attempts == 1
    assert claimed.previous_status is Status.PENDING
    delivery = outbox.get_delivery(enq.delivery_id)
    assert delivery.status is Status.SENDING
    assert delivery.locked_by == "worker-7"
    assert delivery.locked_until == claimed.locked_until
    assert 119 <= (claimed.locked_until - claimed.claimed_at).total_seconds() <= 121


def test_claim_is_one_round_trip(engine: sa.Engine, outbox: Outbox) -> None:
    """Claiming a batch is one statement, not one query per row."""
    outbox.enqueue_many([make_mail(cc=["c@example.com"]) for _ in range(20)])
    statements: list[str] = []
    with engine.begin() as conn:
        sa.event.listen(conn, "before_cursor_execute", lambda *args: statements.append(args[2]))
        rows = outbox.store.claim_due(conn, limit=50, worker="w", lease_seconds=60)
    assert len(rows) == 20
    assert len(statements) == 1
    assert all(len(r.recipients) == 2 for r in rows)


def test_claim_respects_limit_and_due_order(engine: sa.Engine, outbox: Outbox) -> None:
    """The oldest due rows come first, no more than the limit."""
    ids = [outbox.enqueue(make_mail()).delivery_id for _ in range(5)]
    first = claim(engine, outbox, limit=2)
    assert [c.delivery_id for c in first] == ids[:2]
    assert [c.delivery_id for c in claim(engine, outbox, limit=10)] == ids[2:]


def test_future_send_at_is_not_claimed(engine: sa.Engine, outbox: Outbox) -> None:
    """A delivery whose send_at lies ahead is not due."""
    from datetime import datetime, timedelta, timezone

    outbox.enqueue(make_mail(send_at=datetime.now(timezone.utc) + timedelta(hours=1)))
    assert claim(engine, outbox) == []


def test_claimed_rows_are_not_claimed_again_while_leased(engine: sa.Engine, outbox: Outbox) -> None:
    """A live lease keeps other workers away."""
    outbox.enqueue(make_mail())
    assert len(claim(engine, outbox, worker="a")) == 1
    assert claim(engine, outbox, worker="b") == []


def test_two_connections_claiming_at_once_get_disjoint_sets(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """SKIP LOCKED: concurrent claims never hand one delivery to two workers."""
    outbox.enqueue_many([make_mail() for _ in range(200)])
    barrier = threading.Barrier(4)
    results: dict[int, list[ClaimedDelivery]] = {}

    def run(i: int) -> None:
        barrier.wait()
        got: list[ClaimedDelivery] = []
        while batch := claim(engine, outbox, limit=7, worker=f"w{i}"):
            got.extend(batch)
        results[i] = got

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [c.delivery_id for got in results.values() for c in got]
    assert len(all_ids) == 200
    assert len(set(all_ids)) == 200


def test_row_locked_by_an_open_claim_is_skipped(engine: sa.Engine, outbox: Outbox) -> None:
    """A claim that has not committed yet holds its rows; another claim skips them."""
    outbox.enqueue_many([make_mail() for _ in range(3)])
    with engine.begin() as slow:
        held = outbox.store.claim_due(slow, limit=2, worker="slow", lease_seconds=60)
        other = claim(engine, outbox, limit=10, worker="fast")
        assert {c.delivery_id for c in other}.isdisjoint({c.delivery_id for c in held})
        assert len(other) == 1


def test_exclude_list_keeps_handled_rows_out_of_the_tick(engine: sa.Engine, outbox: Outbox) -> None:
    """A row retried with zero delay is not claimed again when its id is excluded."""
    outbox.enqueue(make_mail())
    [c] = claim(engine, outbox)
    complete(
        engine,
        outbox,
        Completion(
            c.delivery_id,
            c.claim_token,
            Status.RETRYING,
            AttemptRecord(Outcome.TRANSIENT_FAILURE),
            0.0,
            "451",
        ),
    )
    assert claim(engine, outbox, exclude=(c.delivery_id,)) == []
    [again] = claim(engine, outbox)
    assert again.delivery_id == c.delivery_id
    assert again.attempts == 2


def test_expired_lease_is_claimed_again_and_recorded(engine: sa.Engine, outbox: Outbox) -> None:
    """Once a lease runs out another worker takes the row; the lost attempt is on record."""
    enq = outbox.enqueue(make_mail())
    [first] = claim(engine, outbox, worker="dead-worker")
    expire_leases(engine)
    [second] = claim(engine, outbox, worker="heir")
    assert second.delivery_id == enq.delivery_id
    assert second.previous_status is Status.SENDING
    assert second.attempts == 2
    assert second.claim_token != first.claim_token
    [lost] = outbox.list_attempts(enq.delivery_id)
    assert lost.outcome is Outcome.LEASE_EXPIRED
    assert lost.worker == "dead-worker"
    assert lost.attempt_no == 1


def test_an_expired_lease_is_claimed_alone_and_before_waiting_mail(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """Rows whose lease ran out come back one per claim, oldest lease first; then batches.

    One of them may be what killed the worker that held them all: claimed alone,
    it cannot charge the others an attempt each time it kills again.
    """
    lost = [r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(3)])]
    claim(engine, outbox, worker="dead-worker")
    expire_leases(engine)
    waiting = {r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(4)])}
    retaken = []
    for _ in lost:
        [one] = claim(engine, outbox, limit=10, worker="heir")
        assert one.previous_status is Status.SENDING
        retaken.append(one.delivery_id)
    assert sorted(retaken) == sorted(lost)
    batch = claim(engine, outbox, limit=10, worker="heir")
    assert {c.delivery_id for c in batch} == waiting
    assert {c.previous_status for c in batch} == {Status.PENDING}
    assert claim(engine, outbox, limit=10) == []


def test_a_lease_that_has_not_expired_does_not_hold_up_waiting_mail(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """Only an expired lease is claimed alone; live leases leave the batch claim alone."""
    outbox.enqueue_many([make_mail() for _ in range(2)])
    claim(engine, outbox, worker="alive", lease=60.0)
    waiting = {r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(5)])}
    assert {c.delivery_id for c in claim(engine, outbox, limit=10)} == waiting


def _attempt_scans(conn: sa.Connection) -> int:
    """Scans of mail_attempts and its indexes by this transaction so far (PostgreSQL's
    own counters; checking a unique key on insert is not a scan)."""
    return int(
        conn.execute(
            sa.text(
                "SELECT sum(pg_stat_get_xact_numscans(oid)) FROM pg_class WHERE oid IN"
                " (SELECT 'mailoutbox.mail_attempts'::regclass UNION ALL SELECT indexrelid"
                " FROM pg_index WHERE indrelid = 'mailoutbox.mail_attempts'::regclass)"
            )
        ).scalar_one()
    )


def _last_attempt_no(engine: sa.Engine, delivery_id: uuid.UUID) -> int | None:
    with engine.connect() as conn:
        number: int | None = conn.execute(
            sa.text(
                "SELECT last_attempt_no FROM mailoutbox.mail_deliveries WHERE delivery_id = :i"
            ),
            {"i": delivery_id},
        ).scalar_one()
    return number


def test_recording_an_attempt_does_not_search_the_attempt_history(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """The claim (a lost lease) and the completion number attempts from the delivery row.

    A search of mail_attempts per attempt cost an index probe each, and a plan made
    while the table looked empty scanned the whole history for every attempt.
    """
    enq = outbox.enqueue(make_mail())
    claim(engine, outbox, worker="dead-worker")
    expire_leases(engine)
    with engine.begin() as conn:
        [c] = outbox.store.claim_due(conn, limit=10, worker="heir", lease_seconds=60)
        assert _attempt_scans(conn) == 0
    with engine.begin() as conn:
        assert outbox.store.complete(conn, [sent(c)]) == {enq.delivery_id}
        assert _attempt_scans(conn) == 0
    assert [a.attempt_no for a in outbox.list_attempts(enq.delivery_id)] == [1, 2]
    assert _last_attempt_no(engine, enq.delivery_id) == 2


def test_a_delivery_from_before_migration_0004_is_numbered_from_its_history(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """A row without last_attempt_no continues its attempt numbers, then keeps them."""
    enq = outbox.enqueue(make_mail())
    [first] = claim(engine, outbox)
    retry = Completion(
        first.delivery_id,
        first.claim_token,
        Status.RETRYING,
        AttemptRecord(Outcome.TRANSIENT_FAILURE),
        0.0,
        "451",
    )
    complete(engine, outbox, retry)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE mailoutbox.mail_deliveries SET last_attempt_no = NULL"))
    [second] = claim(engine, outbox)
    assert complete(engine, outbox, sent(second)) == {enq.delivery_id}
    assert [a.attempt_no for a in outbox.list_attempts(enq.delivery_id)] == [1, 2]
    assert _last_attempt_no(engine, enq.delivery_id) == 2


def test_stale_claim_token_changes_nothing(engine: sa.Engine, outbox: Outbox) -> None:
    """A worker that lost its lease cannot overwrite the new holder's outcome."""
    enq = outbox.enqueue(make_mail())
    [stale] = claim(engine, outbox, worker="slow")
    expire_leases(engine)
    [fresh] = claim(engine, outbox, worker="heir")
    assert complete(engine, outbox, sent(stale)) == set()
    assert outbox.get_delivery(enq.delivery_id).status is Status.SENDING
    assert complete(engine, outbox, sent(fresh)) == {enq.delivery_id}
    assert complete(engine, outbox, sent(fresh)) == set()
    attempts = outbox.list_attempts(enq.delivery_id)
    assert [a.outcome for a in attempts] == [Outcome.LEASE_EXPIRED, Outcome.SENT]


def test_mark_sent_records_attempt_and_clears_lease(engine: sa.Engine, outbox: Outbox) -> None:
    """Completion as sent stamps sent_at, appends the attempt and releases the lease."""
    enq = outbox.enqueue(make_mail())
    [c] = claim(engine, outbox)
    with engine.begin() as conn:
        assert outbox.store.mark_sent_if_claimed(conn, sent(c))
    d = outbox.get_delivery(enq.delivery_id)
    assert d.status is Status.SENT and d.sent_at is not None
    assert d.locked_by is None and d.locked_until is None and d.next_attempt_at is None
    [a] = outbox.list_attempts(enq.delivery_id)
    assert a.outcome is Outcome.SENT and a.attempt_no == 1 and a.worker == "w1"
    assert (
        a.finished_at is not None and 0.15 < (a.finished_at - a.started_at).total_seconds() < 0.25
    )


def test_schedule_retry_arms_next_attempt_on_database_clock(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """A retry is due retry_delay seconds after the database's now()."""
    enq = outbox.enqueue(make_mail())
    [c] = claim(engine, outbox)
    attempt = AttemptRecord(
        Outcome.TRANSIENT_FAILURE,
        error="451 4.3.0 try later",
        error_class="TransientSendError",
        smtp_code=451,
        smtp_enhanced_code="4.3.0",
    )
    with engine.begin() as conn:
        assert outbox.store.schedule_retry_if_claimed(
            conn,
            Completion(
                c.delivery_id, c.claim_token, Status.RETRYING, attempt, 300.0, "451 4.3.0 try later"
            ),
        )
        db_now = conn.execute(sa.select(sa.func.now())).scalar_one()
    d = outbox.get_delivery(enq.delivery_id)
    assert d.status is Status.RETRYING
    assert d.last_error == "451 4.3.0 try later"
    assert d.next_attempt_at is not None
    assert abs((d.next_attempt_at - db_now).total_seconds() - 300) < 2
    [a] = outbox.list_attempts(enq.delivery_id)
    assert (a.smtp_code, a.smtp_enhanced_code, a.error_class) == (
        451,
        "4.3.0",
        "TransientSendError",
    )


def test_mark_dead_lettered_archives_the_reason(engine: sa.Engine, outbox: Outbox) -> None:
    """Dead-lettering sets the state, stamps the time and adds a dead-letter row."""
    enq = outbox.enqueue(make_mail())
    [c] = claim(engine, outbox)
    with engine.begin() as conn:
        assert outbox.store.mark_dead_lettered_if_claimed(
            conn,
            Completion(
                c.delivery_id,
                c.claim_token,
                Status.DEAD_LETTERED,
                AttemptRecord(
                    Outcome.PERMANENT_FAILURE,
                    smtp_code=550,
                    refused={"a@example.com": [550, "no such user"]},
                ),
                reason="550 5.1.1 no such user",
            ),
        )
    d = outbox.get_delivery(enq.delivery_id)
    assert d.status is Status.DEAD_LETTERED and d.dead_lettered_at is not None
    [dl] = outbox.list_dead_letters().items
    assert dl.delivery_id == enq.delivery_id and dl.reason == "550 5.1.1 no such user"
    [a] = outbox.list_attempts(enq.delivery_id)
    assert a.refused == {"a@example.com": [550, "no such user"]}


def test_batch_completion_is_one_statement(engine: sa.Engine, outbox: Outbox) -> None:
    """Completing a whole claimed batch, mixed outcomes included, is a single statement."""
    outbox.enqueue_many([make_mail() for _ in range(30)])
    claimed = claim(engine, outbox)
    completions = [
        sent(c)
        if i % 3 == 0
        else Completion(
            c.delivery_id,
            c.claim_token,
            Status.RETRYING,
            AttemptRecord(Outcome.TRANSIENT_FAILURE),
            60.0,
            "busy",
        )
        if i % 3 == 1
        else Completion(
            c.delivery_id,
            c.claim_token,
            Status.DEAD_LETTERED,
            AttemptRecord(Outcome.PERMANENT_FAILURE),
            reason="bad",
        )
        for i, c in enumerate(claimed)
    ]
    statements: list[str] = []
    with engine.begin() as conn:
        sa.event.listen(conn, "before_cursor_execute", lambda *a: statements.append(a[2]))
        done = outbox.store.complete(conn, completions)
    assert len(statements) == 1
    assert done == {c.delivery_id for c in claimed}
    counts = outbox.count_by_status()
    assert (counts[Status.SENT], counts[Status.RETRYING], counts[Status.DEAD_LETTERED]) == (
        10,
        10,
        10,
    )
    assert row_counts(engine)["mail_attempts"] == 30
    assert row_counts(engine)["mail_dead_letters"] == 10


def test_completion_without_attempt_adds_no_attempt_row(engine: sa.Engine, outbox: Outbox) -> None:
    """A completion that carries no attempt (e.g. expiry found at claim) leaves history alone."""
    outbox.enqueue(make_mail())
    [c] = claim(engine, outbox)
    complete(
        engine,
        outbox,
        Completion(c.delivery_id, c.claim_token, Status.DEAD_LETTERED, None, reason="expired"),
    )
    assert row_counts(engine)["mail_attempts"] == 0
    assert row_counts(engine)["mail_dead_letters"] == 1


def test_release_hands_rows_back_due_now_with_attempt_returned(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """A worker stopping before it sends gives its rows back untouched."""
    enq = outbox.enqueue(make_mail())
    [c] = claim(engine, outbox)
    with engine.begin() as conn:
        assert outbox.store.release(conn, [c.delivery_id], uuid.uuid4()) == 0
        assert outbox.store.release(conn, [c.delivery_id], c.claim_token) == 1
    d = outbox.get_delivery(enq.delivery_id)
    assert (d.status, d.attempts, d.locked_by) == (Status.PENDING, 0, None)
    assert [x.delivery_id for x in claim(engine, outbox)] == [enq.delivery_id]
