"""The worker against real PostgreSQL, with an in-memory transport for the outcomes."""

from __future__ import annotations

import collections
import contextlib
import email.parser
import email.policy
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from mailoutbox import (
    InvalidMail,
    Outbox,
    Outcome,
    PermanentSendError,
    SendResult,
    Status,
    TransientSendError,
    UnknownSendOutcome,
)
from mailoutbox.delivery import RETRIED_PER_TICK
from mailoutbox.records import ClaimedDelivery
from mailoutbox.retry import RetryPolicy
from mailoutbox.transports.base import Envelope
from mailoutbox.transports.memory import MemoryTransport
from mailoutbox.worker import TickReport, Worker

from .async_bridge import make_worker
from .conftest import SCHEMA
from .factories import make_mail, row_counts, running, wait_until
from .test_store_claim import expire_leases

NO_DELAY = RetryPolicy(max_attempts=3, base_delay=timedelta(0), max_delay=timedelta(0))


def worker(outbox: Outbox, transport: object, **kwargs: object) -> Worker:
    """A worker of the outbox's kind: Worker, or AsyncWorker behind the same API."""
    kwargs.setdefault("retry", NO_DELAY)
    return make_worker(outbox, transport, name="test-worker", **kwargs)  # type: ignore[no-any-return]


def failing(exc: Exception) -> MemoryTransport:
    def handler(envelope: Envelope) -> None:
        raise exc

    return MemoryTransport(handler)


def listening_backends(engine: sa.Engine) -> int:
    """Connections of the test's database that have run LISTEN (a worker's listener)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE 'LISTEN %'"
                )
            ).scalar_one()
        )


def test_tick_sends_due_mail_and_records_the_attempt(outbox: Outbox) -> None:
    """A tick renders, sends and marks sent; the attempt row says so."""
    enq = outbox.enqueue(
        make_mail(to=["a@example.com"], bcc=["hidden@example.com"], subject="Grüße")
    )
    transport = MemoryTransport()
    report = worker(outbox, transport).tick()
    assert report == TickReport(claimed=1, sent=1)
    [envelope] = transport.sent
    assert envelope.recipients == ("a@example.com", "hidden@example.com")
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(envelope.message)
    assert parsed["Subject"] == "Grüße"
    assert parsed["Bcc"] is None and b"hidden@example.com" not in envelope.message
    assert parsed["Message-ID"] == envelope.message_id
    delivery = outbox.get_delivery(enq.delivery_id)
    assert delivery.status is Status.SENT and delivery.attempts == 1
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert attempt.outcome is Outcome.SENT and attempt.worker == "test-worker"


def test_tick_with_nothing_due_reports_nothing(outbox: Outbox) -> None:
    """An empty outbox gives an empty report."""
    assert worker(outbox, MemoryTransport()).tick() == TickReport()


def test_tick_drains_several_batches(outbox: Outbox) -> None:
    """One tick keeps claiming batches until nothing is due."""
    outbox.enqueue_many([make_mail() for _ in range(25)])
    transport = MemoryTransport()
    report = worker(outbox, transport, batch_size=10, concurrency=4).tick()
    assert report.claimed == 25 and report.sent == 25
    assert len({e.delivery_id for e in transport.sent}) == 25
    assert outbox.count_by_status()[Status.SENT] == 25


def test_tick_takes_over_a_dead_workers_batch_and_the_mail_behind_it(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """Expired leases come back one per claim, and the tick goes on to the waiting mail."""
    lost = {r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(4)])}
    with engine.begin() as conn:
        outbox.store.claim_due(conn, limit=10, worker="dead", lease_seconds=60.0)
    expire_leases(engine)
    waiting = {r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(6)])}
    transport = MemoryTransport()
    report = worker(outbox, transport, batch_size=10).tick()
    assert report.claimed == 10 and report.sent == 10
    assert {e.delivery_id for e in transport.sent} == lost | waiting
    assert outbox.count_by_status()[Status.SENT] == 10


def test_transient_failure_schedules_retry_by_policy(engine: sa.Engine, outbox: Outbox) -> None:
    """A 4xx-style failure moves the delivery to retrying, due after the policy's delay."""
    enq = outbox.enqueue(make_mail())
    policy = RetryPolicy(base_delay=timedelta(seconds=60), rng=lambda: 0.5)
    transport = failing(TransientSendError(451, "4.3.0 try again later", enhanced_code="4.3.0"))
    report = worker(outbox, transport, retry=policy).tick()
    assert report == TickReport(claimed=1, retried=1)
    delivery = outbox.get_delivery(enq.delivery_id)
    assert delivery.status is Status.RETRYING
    assert "451" in delivery.last_error
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert attempt.outcome is Outcome.TRANSIENT_FAILURE
    assert (attempt.smtp_code, attempt.smtp_enhanced_code) == (451, "4.3.0")
    assert attempt.error_class == "TransientSendError"
    assert delivery.next_attempt_at is not None and attempt.finished_at is not None
    wait = (delivery.next_attempt_at - attempt.finished_at).total_seconds()
    assert 29 <= wait <= 31


def test_permanent_failure_dead_letters_at_once(outbox: Outbox) -> None:
    """A 5xx-style failure dead-letters on the first attempt, with the reason archived."""
    enq = outbox.enqueue(make_mail())
    transport = failing(PermanentSendError(550, "5.1.1 no such user", enhanced_code="5.1.1"))
    report = worker(outbox, transport).tick()
    assert report == TickReport(claimed=1, dead_lettered=1)
    delivery = outbox.get_delivery(enq.delivery_id)
    assert delivery.status is Status.DEAD_LETTERED
    [dead] = outbox.list_dead_letters().items
    assert dead.delivery_id == enq.delivery_id
    assert dead.reason.startswith("permanent failure: 550")


def test_zero_delay_retry_is_not_claimed_twice_in_one_tick(outbox: Outbox) -> None:
    """With no retry delay, one tick still tries a delivery only once."""
    enq = outbox.enqueue(make_mail())
    transport = failing(TransientSendError(421, "busy"))
    w = worker(outbox, transport)
    assert w.tick() == TickReport(claimed=1, retried=1)
    assert len(transport.failed) == 1
    assert w.tick() == TickReport(claimed=1, retried=1)
    assert len(outbox.list_attempts(enq.delivery_id)) == 2


def test_sends_begin_only_while_half_the_batch_lease_is_left(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """One lease covers a batch. Against a relay slow enough the batch's last sends
    would begin after its lease ran out, and the worker that takes the lease over
    would send them too. A send begins only while half the lease is left; the rest
    go back unsent, due at once, and each mail is sent once."""
    ids = [r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(6)])]
    sends: collections.Counter[uuid.UUID] = collections.Counter()
    count = threading.Lock()

    def relay(delay: float) -> MemoryTransport:
        def handler(envelope: Envelope) -> None:
            with count:
                sends[envelope.delivery_id] += 1
            time.sleep(delay)

        return MemoryTransport(handler)

    slow = worker(outbox, relay(0.5), batch_size=6, concurrency=1, lease=timedelta(seconds=2))
    heir = worker(outbox, relay(0.0), batch_size=6)
    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(1) as pool:
        slow_tick = pool.submit(slow.tick)
        time.sleep(2.6)  # past the slow worker's lease, whatever it still holds
        heir_report = heir.tick()
        slow_report = slow_tick.result(timeout=10)
    assert sends == collections.Counter(dict.fromkeys(ids, 1))
    assert 0 < slow_report.sent < 6
    assert slow_report.released == 6 - slow_report.sent
    assert heir_report == TickReport(claimed=slow_report.released, sent=slow_report.released)
    assert "lengthen the lease" in caplog.text


def test_a_tick_ends_after_a_thousand_retries_and_the_next_carries_on(outbox: Outbox) -> None:
    """A relay deferring everything: each tick retries at most 1,000, none of them twice.

    The claims of one tick carry the ids it retried; ending the tick there keeps that
    list, and every claim, short over a backlog of any size.
    """
    outbox.enqueue_many([make_mail() for _ in range(RETRIED_PER_TICK + 250)])
    transport = failing(TransientSendError(451, "4.7.1 too many messages, try again later"))
    half_an_hour = RetryPolicy(base_delay=timedelta(hours=1), rng=lambda: 0.5)
    w = worker(outbox, transport, retry=half_an_hour)
    assert w.tick() == TickReport(claimed=RETRIED_PER_TICK, retried=RETRIED_PER_TICK)
    assert outbox.count_by_status()[Status.PENDING] == 250
    assert w.tick() == TickReport(claimed=250, retried=250)
    assert w.tick() == TickReport()
    assert len(transport.failed) == RETRIED_PER_TICK + 250
    assert outbox.count_by_status()[Status.RETRYING] == RETRIED_PER_TICK + 250


def test_transient_failures_end_in_dead_letter_after_max_attempts(outbox: Outbox) -> None:
    """A server that says 4xx forever exhausts max_attempts and dead-letters."""
    enq = outbox.enqueue(make_mail())
    w = worker(outbox, failing(TransientSendError(450, "mailbox busy")))
    reports = [w.tick() for _ in range(4)]
    assert [r.retried for r in reports] == [1, 1, 0, 0]
    assert reports[2].dead_lettered == 1
    delivery = outbox.get_delivery(enq.delivery_id)
    assert delivery.status is Status.DEAD_LETTERED
    assert delivery.last_error.startswith("attempts exhausted (3)")
    assert [a.attempt_no for a in outbox.list_attempts(enq.delivery_id)] == [1, 2, 3]


def test_unknown_outcome_is_retried_with_the_same_message_id(outbox: Outbox) -> None:
    """A reply lost after DATA is recorded as unknown and retried with the same Message-ID."""
    enq = outbox.enqueue(make_mail())
    seen: list[str] = []

    def handler(envelope: Envelope) -> None:
        seen.append(envelope.message_id)
        if len(seen) == 1:
            raise UnknownSendOutcome(None, "connection lost after DATA")

    w = worker(outbox, MemoryTransport(handler))
    assert w.tick().retried == 1
    assert w.tick().sent == 1
    assert seen[0] == seen[1]
    outcomes = [a.outcome for a in outbox.list_attempts(enq.delivery_id)]
    assert outcomes == [Outcome.UNKNOWN, Outcome.SENT]


def test_partial_refusal_counts_as_sent_and_records_refused(outbox: Outbox) -> None:
    """Recipients refused while others were accepted are recorded; the delivery is sent."""
    enq = outbox.enqueue(make_mail(to=["a@example.com", "gone@example.com"]))
    transport = MemoryTransport(
        lambda e: SendResult(refused={"gone@example.com": (550, "5.1.1 no such user")})
    )
    assert worker(outbox, transport).tick().sent == 1
    assert outbox.get_delivery(enq.delivery_id).status is Status.SENT
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert attempt.refused == {"gone@example.com": [550, "5.1.1 no such user"]}


def test_recipients_refused_for_now_are_retried_alone_until_the_last_attempt(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """A 4xx for some recipients while others were accepted: the mail is retried for
    them alone (it used to be `sent`, and they never got it). A refusal is matched to
    its recipient with the domain's case ignored. When the attempts run out the mail is
    dead-lettered, so that it is seen, with what was settled kept for a resend."""
    enq = outbox.enqueue(make_mail(to=["a@example.com", "Grey@Example.COM"], bcc=["b@example.com"]))
    replies = [
        {"Grey@example.com": (451, "4.7.1 greylisted"), "b@example.com": (550, "no such user")},
        {"Grey@example.com": (450, "4.2.1 busy")},
    ]
    transport = MemoryTransport(lambda envelope: SendResult(refused=replies.pop(0)))
    w = worker(outbox, transport, retry=RetryPolicy(max_attempts=2, base_delay=timedelta(0)))
    with caplog.at_level(logging.INFO, logger="mailoutbox.delivery"):
        assert w.tick() == TickReport(claimed=1, retried=1)
        assert w.tick() == TickReport(claimed=1, dead_lettered=1)
    assert [e.recipients for e in transport.sent] == [
        ("a@example.com", "Grey@Example.COM", "b@example.com"),
        ("Grey@Example.COM",),
    ]
    delivery = outbox.get_delivery(enq.delivery_id)
    assert delivery.status is Status.DEAD_LETTERED
    assert delivery.settled_recipients == ("a@example.com", "b@example.com")
    assert delivery.last_error == (
        "attempts exhausted (2): 1 of 1 recipient(s) refused for now; first: 450 4.2.1 busy"
    )
    first, second = outbox.list_attempts(enq.delivery_id)
    assert (first.outcome, first.smtp_code, second.outcome, second.smtp_code) == (
        Outcome.SENT,
        451,
        Outcome.SENT,
        450,
    )
    assert first.error == "1 of 3 recipient(s) refused for now; first: 451 4.7.1 greylisted"
    assert [r.getMessage() for r in caplog.records if "for now" in r.getMessage()] == [
        f"delivery {enq.delivery_id} attempt 1 sent; 1 recipient(s) refused for now (451),"
        " retried alone",
        f"delivery {enq.delivery_id} attempt 2 sent; 1 recipient(s) refused for now (450),"
        " attempts exhausted (2)",
    ]


def test_a_refusal_spelled_in_another_case_is_matched_to_its_recipient(outbox: Outbox) -> None:
    """A transport may report addresses normalised: Bob still gets the mail on retry."""
    outbox.enqueue(make_mail(to=["ann@example.com", "Bob.Smith@Example.com"]))
    replies = [{"bob.smith@example.com": (451, "4.7.1 try later")}, {}]
    transport = MemoryTransport(lambda envelope: SendResult(refused=replies.pop(0)))
    w = worker(outbox, transport, retry=RetryPolicy(base_delay=timedelta(0)))
    assert w.tick() == TickReport(claimed=1, retried=1)
    assert w.tick() == TickReport(claimed=1, sent=1)
    assert transport.sent[-1].recipients == ("Bob.Smith@Example.com",)


def test_mail_expiring_before_it_reached_the_rest_says_so(
    engine: sa.Engine, outbox: Outbox
) -> None:
    enq = outbox.enqueue(make_mail(to=["ann@example.com", "grey@example.com"]))
    refused = {"grey@example.com": (451, "4.7.1 greylisted")}
    transport = MemoryTransport(lambda envelope: SendResult(refused=refused))
    assert worker(outbox, transport).tick() == TickReport(claimed=1, retried=1)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"UPDATE {SCHEMA}.mail_deliveries SET expires_at = now(), next_attempt_at = now()"
            )
        )
    assert worker(outbox, transport).tick() == TickReport(claimed=1, dead_lettered=1)
    last = outbox.list_attempts(enq.delivery_id)[-1]
    assert (last.outcome, last.error) == (
        Outcome.EXPIRED,
        "expired before it could be sent to the rest of its recipients",
    )
    assert len(transport.sent) == 1


@pytest.mark.parametrize(
    "refused",
    [
        {"someone-else@example.com": (451, "not one of this mail's recipients")},
        {"gone@example.com": (None, "a refusal without a code")},
    ],
)
def test_a_refusal_that_names_no_recipient_or_no_4xx_is_not_retried(
    outbox: Outbox, refused: dict[str, tuple[int | None, str]]
) -> None:
    enq = outbox.enqueue(make_mail(to=["a@example.com", "gone@example.com"]))
    transport = MemoryTransport(lambda envelope: SendResult(refused=refused))  # type: ignore[arg-type]
    assert worker(outbox, transport).tick() == TickReport(claimed=1, sent=1)
    assert outbox.get_delivery(enq.delivery_id).settled_recipients == ()


def test_unexpected_transport_error_dead_letters_only_that_delivery(outbox: Outbox) -> None:
    """A transport bug on one delivery never stops the others or the worker."""
    mails = [make_mail(subject=s) for s in ("ok-1", "boom", "ok-2")]
    results = outbox.enqueue_many(mails)

    def handler(envelope: Envelope) -> None:
        if b"Subject: boom" in envelope.message:
            raise RuntimeError("transport bug")

    report = worker(outbox, MemoryTransport(handler)).tick()
    assert report == TickReport(claimed=3, sent=2, dead_lettered=1)
    broken = outbox.get_delivery(results[1].delivery_id)
    assert broken.status is Status.DEAD_LETTERED
    [attempt] = outbox.list_attempts(results[1].delivery_id)
    assert attempt.error_class == "RuntimeError" and "transport bug" in attempt.error


def test_network_errors_from_a_transport_are_transient(outbox: Outbox) -> None:
    """ConnectionError and TimeoutError from any transport are retried."""
    outbox.enqueue(make_mail())
    outbox.enqueue(make_mail())
    errors = iter([ConnectionResetError("reset"), TimeoutError("slow")])

    def handler(envelope: Envelope) -> None:
        raise next(errors)

    assert worker(outbox, MemoryTransport(handler), concurrency=1).tick().retried == 2


def test_message_that_fails_to_render_is_dead_lettered(engine: sa.Engine, outbox: Outbox) -> None:
    """Stored parts that cannot render dead-letter that delivery; the rest go out."""
    bad = outbox.enqueue(make_mail()).delivery_id
    good = outbox.enqueue(make_mail()).delivery_id
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE mailoutbox.mail_payloads p SET content_type = 'application/x-broken'"
                " FROM mailoutbox.mail_deliveries d"
                " WHERE d.payload_id = p.payload_id AND d.delivery_id = :id"
            ),
            {"id": bad},
        )
    report = worker(outbox, MemoryTransport()).tick()
    assert report == TickReport(claimed=2, sent=1, dead_lettered=1)
    assert outbox.get_delivery(good).status is Status.SENT
    [attempt] = outbox.list_attempts(bad)
    assert attempt.outcome is Outcome.PERMANENT_FAILURE
    assert attempt.error.startswith("render failed")


def test_future_send_at_is_not_sent_before_its_time(outbox: Outbox) -> None:
    """send_at in the future: nothing is sent yet."""
    outbox.enqueue(make_mail(send_at=datetime.now(timezone.utc) + timedelta(hours=1)))
    transport = MemoryTransport()
    assert worker(outbox, transport).tick() == TickReport()
    assert transport.sent == []


def test_a_send_at_already_past_keeps_the_whole_retry_budget(outbox: Outbox) -> None:
    """A send_at computed late ("remind three days before", worked out a day before)
    lies in the past. Its retry age starts at the enqueue, not at send_at: the first
    greylisting 451 is retried instead of dead-lettering the mail as 'max age exceeded'
    (the default max age is two days). Both enqueue paths."""
    past = datetime.now(timezone.utc) - timedelta(days=3)
    one = outbox.enqueue(make_mail(send_at=past)).delivery_id
    [many] = [r.delivery_id for r in outbox.enqueue_many([make_mail(send_at=past)])]
    deferring = failing(TransientSendError(451, "4.7.1 greylisted, try again later"))
    report = worker(outbox, deferring, retry=RetryPolicy()).tick()
    assert report == TickReport(claimed=2, retried=2)
    assert {outbox.get_delivery(i).status for i in (one, many)} == {Status.RETRYING}


def test_expired_mail_is_dead_lettered_not_sent(engine: sa.Engine, outbox: Outbox) -> None:
    """A delivery past expires_at is dead-lettered with reason 'expired' and never sent."""
    enq = outbox.enqueue(make_mail(expires_at=datetime.now(timezone.utc) + timedelta(hours=1)))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE mailoutbox.mail_deliveries SET expires_at = now() - interval '1 minute'"
            )
        )
    transport = MemoryTransport()
    assert worker(outbox, transport).tick() == TickReport(claimed=1, dead_lettered=1)
    assert transport.sent == []
    delivery = outbox.get_delivery(enq.delivery_id)
    assert (delivery.status, delivery.last_error) == (Status.DEAD_LETTERED, "expired")
    assert outbox.list_dead_letters().items[0].reason == "expired"
    assert [a.outcome for a in outbox.list_attempts(enq.delivery_id)] == [Outcome.EXPIRED]


def test_delivery_whose_workers_always_die_ends_dead_lettered(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """Leases lost max_attempts times in a row dead-letter the delivery instead of looping."""
    enq = outbox.enqueue(make_mail())
    for i in range(3):
        with engine.begin() as conn:
            outbox.store.claim_due(conn, limit=1, worker=f"doomed-{i}", lease_seconds=60)
            conn.execute(
                sa.text(
                    "UPDATE mailoutbox.mail_deliveries"
                    " SET next_attempt_at = now() - interval '1 second'"
                )
            )
    transport = MemoryTransport()
    assert worker(outbox, transport).tick() == TickReport(claimed=1, dead_lettered=1, taken_over=1)
    assert transport.sent == []
    delivery = outbox.get_delivery(enq.delivery_id)
    assert delivery.status is Status.DEAD_LETTERED
    # Not "lost each time": a soak test saw the reason on mail whose earlier attempts
    # had been refused by the server, and only its last one lost.
    assert delivery.last_error == (
        "attempts exhausted (3): the worker holding the last one was lost"
        " (see the attempts for the others)"
    )
    outcomes = [a.outcome for a in outbox.list_attempts(enq.delivery_id)]
    assert outcomes == [Outcome.LEASE_EXPIRED] * 3


def test_no_connection_idles_in_transaction_while_the_transport_blocks(
    engine: sa.Engine, db_url: sa.URL, outbox: Outbox
) -> None:
    """During a send, none of the worker's connections holds a transaction open."""
    outbox.enqueue_many([make_mail() for _ in range(4)])
    sending = threading.Event()
    release = threading.Event()

    def handler(envelope: Envelope) -> None:
        sending.set()
        release.wait(10)

    w = worker(outbox, MemoryTransport(handler), concurrency=4)
    ticking = threading.Thread(target=w.tick)
    ticking.start()
    try:
        assert sending.wait(10)
        time.sleep(0.2)
        with engine.connect() as conn:
            states = (
                conn.execute(
                    sa.text(
                        "SELECT state FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
                .scalars()
                .all()
            )
    finally:
        release.set()
        ticking.join(10)
        w.close()
    assert "idle in transaction" not in states
    assert outbox.count_by_status()[Status.SENT] == 4


def test_concurrent_ticks_never_send_a_delivery_twice(outbox: Outbox) -> None:
    """Four workers ticking at once deliver every mail exactly once."""
    outbox.enqueue_many([make_mail() for _ in range(200)])
    transport = MemoryTransport()
    workers = [worker(outbox, transport, batch_size=7, concurrency=2) for _ in range(4)]
    threads = [threading.Thread(target=w.tick) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [e.delivery_id for e in transport.sent]
    assert len(ids) == 200 and len(set(ids)) == 200
    assert outbox.count_by_status()[Status.SENT] == 200


def test_stale_worker_completion_is_fenced_off(engine: sa.Engine, outbox: Outbox) -> None:
    """A worker whose lease ran out mid-send records nothing over the new holder."""
    enq = outbox.enqueue(make_mail())
    took_over = threading.Event()

    def handler(envelope: Envelope) -> None:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE mailoutbox.mail_deliveries"
                    " SET next_attempt_at = now() - interval '1 second'"
                )
            )
            claimed: list[ClaimedDelivery] = outbox.store.claim_due(
                conn, limit=1, worker="heir", lease_seconds=60
            )
        assert len(claimed) == 1
        took_over.set()

    report = worker(outbox, MemoryTransport(handler)).tick()
    assert took_over.is_set()
    assert report == TickReport(claimed=1, lost=1)
    delivery = outbox.get_delivery(enq.delivery_id)
    assert (delivery.status, delivery.locked_by) == (Status.SENDING, "heir")


def test_run_wakes_on_notify_when_mail_is_enqueued(outbox: Outbox) -> None:
    """With a long poll interval, a committed enqueue is still sent within moments."""
    transport = MemoryTransport()
    with running(worker(outbox, transport, poll_interval=timedelta(seconds=60))):
        time.sleep(0.5)
        started = time.monotonic()
        outbox.enqueue(make_mail())
        while not transport.sent and time.monotonic() - started < 10:
            time.sleep(0.02)
        latency = time.monotonic() - started
    assert len(transport.sent) == 1
    assert latency < 2.0


def test_run_survives_its_listening_connection_being_dropped_with_one_log_line(
    db_url: sa.URL, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The server ends the LISTEN connection: a one-line warning, no traceback, mail still sent.

    The poll interval is a minute, so only a new LISTEN (or the loop's retry)
    can deliver the mail enqueued afterwards within the test's time.
    """
    transport = MemoryTransport()
    killer = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    listening = sa.text(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()"
    )

    def listeners() -> list[int]:
        with killer.connect() as conn:
            return list(conn.execute(listening).scalars())

    try:
        with (
            caplog.at_level(logging.WARNING),
            running(worker(outbox, transport, poll_interval=timedelta(seconds=60))),
        ):
            wait_until(lambda: len(listeners()) == 1, 10, "the worker's LISTEN")
            [pid] = listeners()
            with killer.connect() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            wait_until(lambda: "database unavailable" in caplog.text, 10, "the worker to notice")
            outbox.enqueue(make_mail())
            wait_until(lambda: len(transport.sent) == 1, 10, "the mail to be sent")
            wait_until(lambda: listeners() not in ([], [pid]), 10, "a new LISTEN")
    finally:
        killer.dispose()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r for r in warnings if r.exc_info] == [], "a lost connection logged a traceback"
    assert all("\n" not in r.getMessage() for r in warnings)


def test_an_idle_worker_whose_connections_all_drop_listens_again_after_one_failure(
    db_url: sa.URL, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """A database restart ends every connection; an idle worker's LISTEN sees it first.

    Its pool's connections were then found dead one at a time as the loop opened its
    next LISTEN, each costing a failure and a doubled wait (3.5 s for three). They
    are retired at the first, as for the worker's own statements (F11).
    """
    transport = MemoryTransport()
    killer = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    everyone_else = sa.text(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    try:
        w = worker(outbox, transport, poll_interval=timedelta(seconds=60))
        with caplog.at_level(logging.WARNING), running(w):
            outbox.enqueue_many([make_mail() for _ in range(3)])  # fills the worker's pool
            wait_until(lambda: len(transport.sent) == 3, 10, "the first mails")
            wait_until(lambda: listening_backends(killer) == 1, 10, "the worker's LISTEN")
            with killer.connect() as conn:
                conn.execute(everyone_else)
            wait_until(lambda: "database unavailable" in caplog.text, 10, "the worker to notice")
            wait_until(lambda: listening_backends(killer) == 1, 10, "a new LISTEN")
            outbox.enqueue(make_mail())
            wait_until(lambda: len(transport.sent) == 4, 10, "the mail after the restart")
        failures = [r for r in caplog.records if "database unavailable" in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in failures]
    finally:
        killer.dispose()


def test_run_poll_only_finds_mail_without_listen(outbox: Outbox) -> None:
    """listen=False (for poolers that drop LISTEN) still delivers by polling."""
    transport = MemoryTransport()
    w = worker(outbox, transport, listen=False, poll_interval=timedelta(milliseconds=200))
    with running(w):
        outbox.enqueue(make_mail())
        deadline = time.monotonic() + 10
        while not transport.sent and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(transport.sent) == 1


def test_mail_handed_back_wakes_a_listening_worker(db_url: sa.URL, outbox: Outbox) -> None:
    """A worker that hands mail back unsent (stopping, or paused by a mail server outage)
    notifies: a listening worker takes the mail at once. It used to wait for that
    worker's next poll, a minute here."""
    from mailoutbox import ServerUnavailable

    outbox.enqueue_many([make_mail() for _ in range(5)])
    other = MemoryTransport()
    watcher = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    with contextlib.ExitStack() as stack:
        stack.callback(watcher.dispose)

        def outage(envelope: Envelope) -> None:
            # Every mail is leased here now: the other worker starts, finds none, listens.
            stack.enter_context(running(worker(outbox, other, poll_interval=timedelta(seconds=60))))
            wait_until(lambda: listening_backends(watcher) == 1, 10, "the other worker's LISTEN")
            time.sleep(0.5)  # past its first tick
            raise ServerUnavailable(None, "connection refused")

        report = worker(outbox, MemoryTransport(outage), batch_size=5, concurrency=1).tick()
        assert (report.claimed, report.retried, report.released) == (5, 1, 4)
        wait_until(lambda: len(other.sent) == 4, 10, "the handed-back mail to be sent")


def stop_with_two_sends_in_flight(outbox: Outbox, mails: int) -> MemoryTransport:
    """Run a worker (batches of 6, 2 send threads) and stop it while two sends hang."""
    outbox.enqueue_many([make_mail() for _ in range(mails)])
    both_in_flight = threading.Barrier(3)
    release = threading.Event()

    def handler(envelope: Envelope) -> None:
        both_in_flight.wait(10)
        release.wait(10)

    transport = MemoryTransport(handler)
    w = worker(outbox, transport, concurrency=2, batch_size=6)
    stop = threading.Event()
    runner = threading.Thread(target=w.run, kwargs={"stop": stop, "handle_signals": False})
    runner.start()
    both_in_flight.wait(10)
    stop.set()
    time.sleep(0.5)
    release.set()
    runner.join(10)
    assert not runner.is_alive()
    return transport


def leases_held(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        leases: int = conn.execute(
            sa.text("SELECT count(*) FROM mailoutbox.mail_deliveries WHERE locked_by IS NOT NULL")
        ).scalar_one()
    return leases


def test_no_batch_is_claimed_while_another_sends(engine: sa.Engine, outbox: Outbox) -> None:
    """Each send sees one batch leased: the next is claimed only once the sends are over.

    A batch claimed while another sends would be charged an attempt each time a
    poison mail in the sending batch killed the worker.
    """
    outbox.enqueue_many([make_mail() for _ in range(15)])
    leased_during_send: list[int] = []
    transport = MemoryTransport(lambda envelope: leased_during_send.append(leases_held(engine)))
    report = worker(outbox, transport, batch_size=5, concurrency=2).tick()
    assert report == TickReport(claimed=15, sent=15)
    assert leased_during_send == [5] * 15


def test_stop_finishes_sends_in_flight_and_hands_back_the_rest(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """On stop: sends in flight complete, unstarted leases are released, none are left."""
    transport = stop_with_two_sends_in_flight(outbox, 6)
    counts = outbox.count_by_status()
    assert counts[Status.SENT] == len(transport.sent) == 2
    assert counts[Status.PENDING] == 4
    assert counts[Status.SENDING] == 0
    assert leases_held(engine) == 0
    assert row_counts(engine)["mail_attempts"] == 2


def test_stop_with_more_mail_due_leaves_no_lease_and_charges_no_unsent_mail(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """Stopped mid-batch with a second batch due: every unsent mail is pending, attempt 0."""
    transport = stop_with_two_sends_in_flight(outbox, 12)
    assert len(transport.sent) == 2
    page = outbox.list_deliveries(limit=20)
    assert page.total == 12
    waiting = [d for d in page.items if d.status is not Status.SENT]
    assert len(waiting) == 10
    assert {(d.status, d.attempts) for d in waiting} == {(Status.PENDING, 0)}
    assert leases_held(engine) == 0
    assert row_counts(engine)["mail_attempts"] == 2


def test_a_stop_asked_before_run_begins_ends_that_run(sync_outbox: Outbox) -> None:
    """`Thread(target=worker.run).start(); worker.stop()`: the stop may land before
    run() begins. It is kept, so the thread ends (it used to run on for ever), and
    the run that met it forgets it: the worker runs again and delivers."""
    sync_outbox.enqueue(make_mail())
    transport = MemoryTransport()
    w = Worker(sync_outbox, transport, retry=NO_DELAY)
    w.stop()
    runner = threading.Thread(target=w.run, kwargs={"handle_signals": False})
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "run() ignored the stop() asked before it began"
    assert transport.sent == []
    assert sync_outbox.count_by_status()[Status.PENDING] == 1
    with running(w):
        wait_until(lambda: len(transport.sent) == 1, 10, "the mail to be sent")


def test_what_a_transport_reports_is_stored_whatever_its_text_so_no_batch_is_lost(
    outbox: Outbox,
) -> None:
    """Texts PostgreSQL refuses (NUL, a lone surrogate) and smtplib's bytes in `refused`
    used to fail the record of the whole batch: every mail in it was sent again after
    the lease. They are stored cleaned, and each mail is sent once."""
    mails = [make_mail(to=[f"u{i}@example.com"]) for i in range(4)]
    ids = [r.delivery_id for r in outbox.enqueue_many(mails)]
    failures = {"u0@example.com": "nul \x00 byte", "u1@example.com": "lone \udcff surrogate"}

    def handler(envelope: Envelope) -> SendResult | None:
        recipient = envelope.recipients[0]
        if recipient in failures:
            raise PermanentSendError(550, failures[recipient])
        if recipient == "u2@example.com":
            # What smtplib's sendmail() returns for a refused recipient: bytes.
            return SendResult(refused={"cc@example.com": (550, b"5.1.1 Unknown \xff")})  # type: ignore[dict-item]
        return None

    transport = MemoryTransport(handler)
    report = worker(outbox, transport, batch_size=4).tick()
    assert (report.claimed, report.sent, report.dead_lettered) == (4, 2, 2)
    assert sorted(e.recipients[0] for e in transport.sent) == ["u2@example.com", "u3@example.com"]
    [nul] = outbox.list_attempts(ids[0])
    [surrogate] = outbox.list_attempts(ids[1])
    [refusing] = outbox.list_attempts(ids[2])
    assert nul.error == "550 nul \ufffd byte"
    assert surrogate.error == "550 lone ? surrogate"
    assert refusing.refused == {"cc@example.com": [550, "5.1.1 Unknown \ufffd"]}
    assert outbox.get_delivery(ids[3]).status is Status.SENT


def test_a_partial_refusal_is_logged_at_info_without_addresses(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The delivery ends `sent`: without this line an operator never hears that a
    recipient did not get it (the attempt row has the details)."""
    enq = outbox.enqueue(make_mail(to=["ann@example.com"], cc=["gone@example.com"]))
    refused = {"gone@example.com": (550, "5.1.1 no such user")}
    with caplog.at_level(logging.INFO, logger="mailoutbox.delivery"):
        worker(outbox, MemoryTransport(lambda envelope: SendResult(refused=refused))).tick()
    [record] = [r for r in caplog.records if "refused" in r.getMessage()]
    assert record.getMessage() == f"delivery {enq.delivery_id} sent; 1 recipient(s) refused (550)"


class Abort(BaseException):
    """Not an Exception: what a gevent-style Timeout or a library's SystemExit is."""


def test_a_transport_raising_a_base_exception_fails_that_delivery_alone(outbox: Outbox) -> None:
    """It used to escape the send thread: the batch went unrecorded (its sent mails were
    sent again after the lease) and run() ended. Now it is that delivery's failure."""
    ids = [r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(3)])]

    def handler(envelope: Envelope) -> None:
        if envelope.delivery_id == ids[1]:
            raise Abort("out of time")

    transport = MemoryTransport(handler)
    w = worker(outbox, transport, batch_size=3)
    report = w.tick()
    assert (report.claimed, report.sent, report.dead_lettered) == (3, 2, 1)
    [attempt] = outbox.list_attempts(ids[1])
    assert (attempt.error_class, attempt.error) == ("Abort", "out of time")
    outbox.enqueue(make_mail())
    assert w.tick() == TickReport(claimed=1, sent=1)
    assert len(transport.sent) == 3


def test_a_send_returning_something_else_than_a_send_result_is_recorded_as_sent(
    outbox: Outbox,
) -> None:
    """smtplib's sendmail() answers {} or {address: (code, bytes)}: the mail went out.
    It used to be dead-lettered ("'dict' object has no attribute 'refused'"), and a
    resend then delivered it twice."""
    ids = [r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(3)])]
    answers: dict[uuid.UUID, object] = {
        ids[0]: {},
        ids[1]: {"cc@example.com": (550, b"No such user")},
        ids[2]: "250 OK",
    }
    transport = MemoryTransport(lambda envelope: answers[envelope.delivery_id])  # type: ignore[arg-type, return-value]
    report = worker(outbox, transport, batch_size=3).tick()
    assert (report.claimed, report.sent) == (3, 3)
    refused = [outbox.list_attempts(i)[0].refused for i in ids]
    assert refused == [None, {"cc@example.com": [550, "No such user"]}, None]


def test_a_never_ending_max_age_does_not_dead_letter_mail_while_the_server_is_down(
    outbox: Outbox,
) -> None:
    """`max_age=timedelta.max` ("never") overflowed the datetime when the server was
    unreachable, and the mail was dead-lettered instead of waiting for it."""
    from mailoutbox import ServerUnavailable

    enq = outbox.enqueue(make_mail())
    never = RetryPolicy(max_age=timedelta.max)
    report = worker(outbox, failing(ServerUnavailable(None, "refused")), retry=never).tick()
    assert report.retried == 1 and report.dead_lettered == 0
    delivery = outbox.get_delivery(enq.delivery_id)
    assert (delivery.status, delivery.attempts) == (Status.RETRYING, 0)


def test_the_sync_worker_refuses_a_coroutine_transport(sync_outbox: Outbox) -> None:
    """Its send would never be awaited: every mail failed unsent."""

    class AsyncTransport:
        async def send(self, envelope: Envelope) -> None:
            return None

    with pytest.raises(TypeError, match="AsyncWorker"):
        Worker(sync_outbox, AsyncTransport())  # type: ignore[arg-type]


def test_a_send_that_returns_an_awaitable_is_awaited_or_handed_back(outbox: Outbox) -> None:
    """A coroutine transport behind a sync wrapper: the async worker awaits what it
    returns; the sync worker cannot, so it hands the mail back uncharged and pauses,
    instead of dead-lettering the whole backlog unsent."""
    enq = outbox.enqueue(make_mail())
    delivered: list[Envelope] = []

    async def deliver(envelope: Envelope) -> None:
        delivered.append(envelope)

    class WrappedTransport:
        def send(self, envelope: Envelope) -> object:
            return deliver(envelope)

    report = worker(outbox, WrappedTransport()).tick()
    delivery = outbox.get_delivery(enq.delivery_id)
    if getattr(outbox, "is_async", False):
        assert report == TickReport(claimed=1, sent=1)
        assert [e.delivery_id for e in delivered] == [enq.delivery_id]
        assert delivery.status is Status.SENT
    else:
        assert report.retried == 1 and report.dead_lettered == 0 and delivered == []
        assert (delivery.status, delivery.attempts) == (Status.RETRYING, 0)


def test_worker_rejects_nonsense_settings(outbox: Outbox) -> None:
    """Zero batch, zero concurrency or a non-positive lease are refused up front."""
    for kwargs in ({"batch_size": 0}, {"concurrency": 0}, {"lease": timedelta(0)}):
        with pytest.raises(ValueError):
            worker(outbox, MemoryTransport(), **kwargs)


def test_a_malformed_message_id_domain_is_refused_before_anything_is_claimed(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """Found at render time, it dead-lettered every mail the worker claimed."""
    outbox.enqueue(make_mail())
    for domain in ("mail.example.com.", "exa mple.com", "-example.com", ""):
        with pytest.raises(InvalidMail, match="Message-ID domain"):
            worker(outbox, MemoryTransport(), message_id_domain=domain)
    assert row_counts(engine)["mail_attempts"] == 0
    transport = MemoryTransport()
    report = worker(outbox, transport, message_id_domain="mail.example.com").tick()
    assert report == TickReport(claimed=1, sent=1)
    assert transport.sent[0].message_id.endswith("@mail.example.com>")


def test_unavailable_server_pauses_the_worker_and_charges_no_attempt(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """No session at all: the delivery retries later with its attempt given back, the rest
    of the batch is handed back untouched, and nothing is claimed while paused."""
    from mailoutbox import ServerUnavailable

    ids = [r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(5)])]
    transport = failing(ServerUnavailable(None, "connection refused"))
    w = worker(outbox, transport, concurrency=1, batch_size=5)
    report = w.tick()
    assert report.claimed == 5 and report.retried == 1 and report.released == 4
    assert len(transport.failed) == 1
    [tried] = [e.delivery_id for e in transport.failed]
    first = outbox.get_delivery(tried)
    assert (first.status, first.attempts) == (Status.RETRYING, 0)
    [attempt] = outbox.list_attempts(tried)
    assert attempt.error_class == "ServerUnavailable"
    for other in set(ids) - {tried}:
        d = outbox.get_delivery(other)
        assert (d.status, d.attempts) == (Status.PENDING, 0)
    assert w.tick() == TickReport()
    assert len(transport.failed) == 1


def test_completion_survives_a_dropped_database_connection(
    db_url: sa.URL, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's connections killed mid-send: the batch's outcome is still recorded."""
    outbox.enqueue_many([make_mail() for _ in range(3)])
    killed: list[int] = []
    killer = sa.create_engine(db_url, poolclass=sa.pool.NullPool)

    def handler(envelope: Envelope) -> None:
        if not killed:
            with killer.connect() as conn:
                killed.extend(
                    conn.execute(
                        sa.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    ).scalars()
                )

    w = worker(outbox, MemoryTransport(handler), concurrency=1, lease=timedelta(seconds=30))
    try:
        report = w.tick()
    finally:
        killer.dispose()
    assert killed, "the test meant to kill the worker's connections"
    assert report.sent == 3 and report.lost == 0
    assert outbox.count_by_status()[Status.SENT] == 3
    assert "could not record a batch's outcome" in caplog.text


def test_a_database_blip_after_progress_costs_the_shortest_wait_each_time(
    db_url: sa.URL, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """Connections dropped in three batches running: each failure waits 0.5 s, not 0.5, 1, 2.

    The worker's backends are killed during the first send of each batch; the
    batch is still recorded (its completion is retried), and the claim beside
    it fails the tick. The loop then waits; since a batch was recorded before
    that failure, the database is up and the wait does not grow.
    """
    outbox.enqueue_many([make_mail() for _ in range(30)])
    killer = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    kills: list[int] = []

    def handler(envelope: Envelope) -> None:
        if len(transport.sent) % 10 == 0:
            with killer.connect() as conn:
                kills.append(
                    len(
                        conn.execute(
                            sa.text(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                            )
                        ).all()
                    )
                )

    transport = MemoryTransport(handler)
    w = worker(
        outbox,
        transport,
        batch_size=10,
        concurrency=1,
        listen=False,
        poll_interval=timedelta(milliseconds=100),
        lease=timedelta(seconds=30),
    )
    sent = sa.text(f"SELECT count(*) FROM {SCHEMA}.mail_deliveries WHERE status = 'sent'")

    def recorded() -> int:
        with killer.connect() as conn:  # a connection of its own: the kills spare it
            return int(conn.execute(sent).scalar_one())

    try:
        with caplog.at_level(logging.WARNING), running(w):
            wait_until(lambda: len(transport.sent) == 30, 10, "every mail sent")
            wait_until(lambda: recorded() == 30, 10, "every mail recorded as sent")
    finally:
        killer.dispose()
    assert len(kills) == 3 and all(kills)
    waits = [
        r.getMessage().rsplit("retry in ", 1)[1]
        for r in caplog.records
        if r.getMessage().startswith("database unavailable")
    ]
    assert waits, "the kills were meant to fail the worker's loop"
    assert set(waits) == {"0.5s"}
    assert len(transport.sent) == 30


def test_completion_retries_stop_before_the_lease_ends() -> None:
    """Completion is retried with growing waits, never past a second before the lease ends."""
    from mailoutbox.delivery import completion_retry_delays

    delays = list(completion_retry_delays(time.monotonic() + 10))
    assert delays[-1] is None
    waits = [d for d in delays if d is not None]
    assert waits[:3] == [0.2, 0.4, 0.8]
    assert sum(waits) < 10
    assert list(completion_retry_delays(time.monotonic())) == [None]


def test_history_rows_get_version_7_ids_in_the_order_they_were_written(
    outbox: Outbox, engine: sa.Engine
) -> None:
    """Recipient, attempt and dead-letter ids are RFC 9562 version 7 UUIDs made from the time.

    These tables only grow: ids that begin with the time keep their inserts on the
    last leaves of each primary key instead of a random page each, which is what
    spares the WAL a full page image per insert after every checkpoint.
    """

    def server_millis() -> int:  # the ids carry the database's clock, not this process's
        with engine.connect() as conn:
            now = "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
            return int(conn.execute(sa.text(now)).scalar_one())

    before = server_millis()
    sent = outbox.enqueue(make_mail(to=["a@example.com", "b@example.com"], cc=["c@example.com"]))
    outbox.enqueue_many([make_mail(to=["d@example.com"])])
    worker(outbox, MemoryTransport()).tick()
    time.sleep(0.005)
    refused = outbox.enqueue(make_mail(to=["e@example.com"]))
    worker(outbox, failing(PermanentSendError(550, "5.1.1 no such user"))).tick()
    after = server_millis()

    def ids(table: str, column: str) -> dict[uuid.UUID, list[uuid.UUID]]:
        by_delivery: dict[uuid.UUID, list[uuid.UUID]] = {}
        with engine.connect() as conn:
            for row_id, delivery_id in conn.execute(
                sa.text(f"SELECT {column}, delivery_id FROM mailoutbox.{table}")
            ):
                by_delivery.setdefault(delivery_id, []).append(row_id)
        return by_delivery

    recipients = ids("mail_recipients", "recipient_id")
    attempts = ids("mail_attempts", "attempt_id")
    dead_letters = ids("mail_dead_letters", "dead_letter_id")
    assert list(dead_letters) == [refused.delivery_id]
    every = [i for table in (recipients, attempts, dead_letters) for v in table.values() for i in v]
    assert len(every) == 5 + 3 + 1  # recipients, attempts, the dead letter
    assert len(set(every)) == len(every)
    for value in every:
        assert value.version == 7 and value.variant == uuid.RFC_4122, value
        assert before <= value.int >> 80 <= after, value  # milliseconds since the epoch
    # Written later, sorted later: the second worker's rows follow the first's.
    assert max(recipients[sent.delivery_id]) < min(recipients[refused.delivery_id])
    assert max(attempts[sent.delivery_id]) < min(attempts[refused.delivery_id])
