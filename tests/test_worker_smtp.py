"""The worker delivering through SmtpTransport to a real SMTP server on loopback.

Each failure the server can answer is staged, and the resulting delivery state,
attempt rows and next_attempt_at are asserted in PostgreSQL.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import logging
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from mailoutbox import Outbox, Outcome, Status
from mailoutbox.retry import RetryPolicy
from mailoutbox.transports.smtp import SmtpTransport
from mailoutbox.worker import TickReport, Worker

from .async_bridge import make_worker
from .factories import make_mail
from .smtp_sink import SmtpSink

POLICY = RetryPolicy(max_attempts=5, base_delay=timedelta(seconds=60), rng=lambda: 0.5)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


def smtp_worker(outbox: Outbox, sink: SmtpSink, **transport_kwargs: object) -> Worker:
    transport_kwargs.setdefault("security", "none")
    transport_kwargs.setdefault("timeout", 5.0)
    transport = SmtpTransport(sink.host, sink.port, **transport_kwargs)  # type: ignore[arg-type]
    return make_worker(  # type: ignore[no-any-return]
        outbox, transport, retry=POLICY, name="smtp-worker", concurrency=2
    )


def parse(data: bytes) -> email.message.EmailMessage:
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(message, email.message.EmailMessage)
    return message


def run_tick(worker: Worker) -> TickReport:
    try:
        return worker.tick()
    finally:
        worker.close()


def assert_retrying_in_30s(outbox: Outbox, delivery_id: object) -> None:
    delivery = outbox.get_delivery(delivery_id)
    assert delivery.status is Status.RETRYING
    last = outbox.list_attempts(delivery_id)[-1]
    assert delivery.next_attempt_at is not None and last.finished_at is not None
    assert 29 <= (delivery.next_attempt_at - last.finished_at).total_seconds() <= 31


def test_delivered_message_parses_back_exactly(outbox: Outbox, sink: SmtpSink) -> None:
    """Subject, parts, headers and Message-ID arrive intact, non-ASCII included."""
    enq = outbox.enqueue(
        make_mail(
            to=["Zoë <zoe@example.com>"],
            cc=["cc@example.com"],
            bcc=["audit@example.com"],
            subject="Grüße – 你好 ✓",
            text="Hallo Zoë, ça va? ✓",
            html="<p>Hallo Zoë ✓</p>",
            headers={"X-Order": "42"},
            reply_to=["help@example.com"],
        )
    )
    assert run_tick(smtp_worker(outbox, sink)) == TickReport(claimed=1, sent=1)
    [received] = sink.messages
    assert received.mail_from == "noreply@example.com"
    assert set(received.rcpt_tos) == {"zoe@example.com", "cc@example.com", "audit@example.com"}
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(received.data)
    assert msg["Subject"] == "Grüße – 你好 ✓"
    assert msg["To"] == "Zoë <zoe@example.com>"
    assert msg["Cc"] == "cc@example.com"
    assert msg["Bcc"] is None and b"audit@example.com" not in received.data
    assert msg["Reply-To"] == "help@example.com"
    assert msg["X-Order"] == "42"
    assert msg["Message-ID"] == f"<{enq.delivery_id}@example.com>"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and text.get_content().rstrip("\r\n") == "Hallo Zoë, ça va? ✓"
    assert html is not None and html.get_content().rstrip("\r\n") == "<p>Hallo Zoë ✓</p>"
    assert outbox.get_delivery(enq.delivery_id).status is Status.SENT


def test_one_connection_is_reused_across_messages(outbox: Outbox, sink: SmtpSink) -> None:
    """Each send thread keeps its SMTP session for the next message."""
    outbox.enqueue_many([make_mail() for _ in range(10)])
    worker = smtp_worker(outbox, sink)
    worker.concurrency = 1
    assert run_tick(worker).sent == 10
    assert sink.connections == 1


def test_421_greeting_pauses_without_charging_an_attempt(outbox: Outbox, sink: SmtpSink) -> None:
    """A 421 at greeting: no session, so the delivery retries after a short pause, uncharged."""
    enq = outbox.enqueue(make_mail())
    sink.greeting = "421 4.3.2 Service not available"
    assert run_tick(smtp_worker(outbox, sink)).retried == 1
    delivery = outbox.get_delivery(enq.delivery_id)
    assert (delivery.status, delivery.attempts) == (Status.RETRYING, 0)
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert (attempt.outcome, attempt.smtp_code) == (Outcome.TRANSIENT_FAILURE, 421)
    assert attempt.error_class == "ServerUnavailable"
    assert delivery.next_attempt_at is not None and attempt.finished_at is not None
    assert (delivery.next_attempt_at - attempt.finished_at).total_seconds() <= 1.5


@pytest.mark.parametrize(
    "reply", ["450 4.2.1 Mailbox busy", "451 4.3.0 Try later", "452 4.2.2 Mailbox full"]
)
def test_4xx_at_rcpt_retries(outbox: Outbox, sink: SmtpSink, reply: str) -> None:
    """A 4xx reply to the only recipient is transient, with code and enhanced code kept."""
    enq = outbox.enqueue(make_mail(to=["busy@example.com"]))
    sink.rcpt_replies = {"busy@example.com": reply}
    assert run_tick(smtp_worker(outbox, sink)).retried == 1
    assert_retrying_in_30s(outbox, enq.delivery_id)
    [attempt] = outbox.list_attempts(enq.delivery_id)
    code, enhanced = reply.split()[:2]
    assert (attempt.smtp_code, attempt.smtp_enhanced_code) == (int(code), enhanced)
    # Each recipient's own reply is kept, as for a partial refusal.
    assert attempt.refused == {"busy@example.com": [int(code), reply.split(" ", 1)[1]]}


def test_550_at_rcpt_dead_letters(outbox: Outbox, sink: SmtpSink) -> None:
    """550 5.1.1 for the only recipient is permanent: dead-lettered with the reason."""
    enq = outbox.enqueue(make_mail(to=["gone@example.com"]))
    sink.rcpt_replies = {"gone@example.com": "550 5.1.1 No such user"}
    assert run_tick(smtp_worker(outbox, sink)).dead_lettered == 1
    delivery = outbox.get_delivery(enq.delivery_id)
    assert delivery.status is Status.DEAD_LETTERED and delivery.next_attempt_at is None
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert (attempt.outcome, attempt.smtp_code, attempt.smtp_enhanced_code) == (
        Outcome.PERMANENT_FAILURE,
        550,
        "5.1.1",
    )
    assert "550" in outbox.list_dead_letters().items[0].reason


def test_garbage_reply_at_rcpt_retries_instead_of_dead_lettering(
    outbox: Outbox, sink: SmtpSink
) -> None:
    """A reply to RCPT with no reply code is a protocol error, retried, not a refusal."""
    enq = outbox.enqueue(make_mail(to=["a@example.com"]))
    sink.rcpt_replies = {"a@example.com": "age of aquarius"}
    assert run_tick(smtp_worker(outbox, sink)).retried == 1
    assert_retrying_in_30s(outbox, enq.delivery_id)
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert (attempt.outcome, attempt.smtp_code) == (Outcome.TRANSIENT_FAILURE, None)


def test_one_of_three_recipients_refused_is_sent_to_the_others(
    outbox: Outbox, sink: SmtpSink
) -> None:
    """Partial refusal: sent to the accepted two, the refused one recorded, no resend."""
    enq = outbox.enqueue(make_mail(to=["a@example.com", "gone@example.com", "c@example.com"]))
    sink.rcpt_replies = {"gone@example.com": "550 5.1.1 No such user"}
    assert run_tick(smtp_worker(outbox, sink)).sent == 1
    [received] = sink.messages
    assert received.rcpt_tos == ("a@example.com", "c@example.com")
    assert outbox.get_delivery(enq.delivery_id).status is Status.SENT
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert attempt.refused is not None and list(attempt.refused) == ["gone@example.com"]
    assert attempt.refused["gone@example.com"][0] == 550


def test_recipients_past_a_relays_limit_all_get_the_mail_bcc_included(
    outbox: Outbox, sink: SmtpSink
) -> None:
    """A relay taking 2 recipients per transaction: to, cc and bcc all get the mail, once."""
    enq = outbox.enqueue(
        make_mail(
            to=["a@example.com", "b@example.com"], cc=["c@example.com"], bcc=["hidden@example.com"]
        )
    )
    sink.max_recipients = 2
    assert run_tick(smtp_worker(outbox, sink)) == TickReport(claimed=1, sent=1)
    first, second = sink.messages
    assert first.rcpt_tos == ("a@example.com", "b@example.com")
    assert second.rcpt_tos == ("c@example.com", "hidden@example.com")
    # (not "d@example.com": a Message-ID whose uuid ends in d would contain it)
    assert first.data == second.data and b"hidden@example.com" not in first.data
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert (attempt.outcome, attempt.refused) == (Outcome.SENT, None)


def test_follow_up_transaction_refused_for_now_is_retried_for_its_recipients_alone(
    outbox: Outbox, sink: SmtpSink
) -> None:
    """A 451 in the transaction after a 452: the rest get the mail on retry, nobody twice."""
    enq = outbox.enqueue(make_mail(to=["a@example.com", "b@example.com", "c@example.com"]))
    sink.max_recipients = 2
    sink.next_data_replies = [None, "451 4.3.0 Try later"]
    assert run_tick(smtp_worker(outbox, sink)) == TickReport(claimed=1, retried=1)
    assert_retrying_in_30s(outbox, enq.delivery_id)
    delivery = outbox.get_delivery(enq.delivery_id)
    assert delivery.settled_recipients == ("a@example.com", "b@example.com")
    [first] = outbox.list_attempts(enq.delivery_id)
    assert (first.outcome, first.smtp_code) == (Outcome.SENT, 451)
    assert first.refused == {"c@example.com": [451, "end of DATA: 4.3.0 Try later"]}
    assert first.error.startswith("1 of 3 recipient(s) refused for now")

    sink_engine_update_due(outbox)
    assert run_tick(smtp_worker(outbox, sink)) == TickReport(claimed=1, sent=1)
    assert [m.rcpt_tos for m in sink.messages] == [
        ("a@example.com", "b@example.com"),
        ("c@example.com",),
    ]
    first_copy, second_copy = (parse(m.data) for m in sink.messages)
    # One message: the retry's copy names every recipient, under the same Message-ID.
    assert second_copy["To"] == first_copy["To"] == "a@example.com, b@example.com, c@example.com"
    assert second_copy["Message-ID"] == first_copy["Message-ID"]
    assert outbox.get_delivery(enq.delivery_id).status is Status.SENT
    assert [
        (a.attempt_no, a.outcome, a.refused) for a in outbox.list_attempts(enq.delivery_id)
    ] == [
        (1, Outcome.SENT, first.refused),
        (2, Outcome.SENT, None),
    ]


def test_greylisted_cc_gets_the_mail_on_retry_and_a_550_is_not_retried(
    outbox: Outbox, sink: SmtpSink
) -> None:
    """One recipient refused for now, one for good: only the first is tried again."""
    enq = outbox.enqueue(
        make_mail(
            to=["a@example.com"],
            cc=["grey@example.com", "gone@example.com"],
            bcc=["hidden@example.com"],
        )
    )
    sink.rcpt_replies = {
        "grey@example.com": "450 4.7.1 Greylisted, try again later",
        "gone@example.com": "550 5.1.1 No such user",
    }
    assert run_tick(smtp_worker(outbox, sink)) == TickReport(claimed=1, retried=1)
    settled = outbox.get_delivery(enq.delivery_id).settled_recipients
    assert settled == ("a@example.com", "gone@example.com", "hidden@example.com")

    sink.rcpt_replies = {"gone@example.com": "550 5.1.1 No such user"}
    sink_engine_update_due(outbox)
    assert run_tick(smtp_worker(outbox, sink)) == TickReport(claimed=1, sent=1)
    assert [m.rcpt_tos for m in sink.messages] == [
        ("a@example.com", "hidden@example.com"),
        ("grey@example.com",),
    ]
    assert run_tick(smtp_worker(outbox, sink)).claimed == 0
    first, second = outbox.list_attempts(enq.delivery_id)
    assert first.refused is not None and sorted(first.refused) == [
        "gone@example.com",
        "grey@example.com",
    ]
    assert second.refused is None


def test_greylisted_recipient_that_turns_out_not_to_exist_leaves_the_mail_sent(
    outbox: Outbox, sink: SmtpSink
) -> None:
    """Greylisting comes before the mailbox check on many servers: 450, then 550. The
    mail reached everyone it could, as if the 550 had come first; it used to be
    dead-lettered, and every resend met the same 550."""
    enq = outbox.enqueue(make_mail(to=["a@example.com", "typo@example.com"]))
    sink.rcpt_replies = {"typo@example.com": "450 4.7.1 Greylisted"}
    assert run_tick(smtp_worker(outbox, sink)) == TickReport(claimed=1, retried=1)
    sink.rcpt_replies = {"typo@example.com": "550 5.1.1 No such user"}
    sink_engine_update_due(outbox)
    assert run_tick(smtp_worker(outbox, sink)) == TickReport(claimed=1, sent=1)
    assert outbox.get_delivery(enq.delivery_id).status is Status.SENT
    assert outbox.list_dead_letters().total == 0
    last = outbox.list_attempts(enq.delivery_id)[-1]
    assert (last.outcome, last.smtp_code) == (Outcome.PERMANENT_FAILURE, 550)
    assert last.refused == {"typo@example.com": [550, "5.1.1 No such user"]}
    assert [m.rcpt_tos for m in sink.messages] == [("a@example.com",)]


def test_a_recipient_refused_for_good_on_a_retry_refused_as_a_whole_is_not_tried_again(
    outbox: Outbox, sink: SmtpSink
) -> None:
    """The retry's recipients all refused, one for now and one for good: the next
    attempt goes to the first alone (the second was tried at every attempt)."""
    enq = outbox.enqueue(make_mail(to=["ok@example.com", "grey@example.com", "typo@example.com"]))
    sink.rcpt_replies = {
        "grey@example.com": "450 4.7.1 Greylisted",
        "typo@example.com": "450 4.7.1 Greylisted",
    }
    assert run_tick(smtp_worker(outbox, sink)) == TickReport(claimed=1, retried=1)
    sink.rcpt_replies = {
        "grey@example.com": "450 4.7.1 Greylisted",
        "typo@example.com": "550 5.1.1 No such user",
    }
    sink_engine_update_due(outbox)
    assert run_tick(smtp_worker(outbox, sink)) == TickReport(claimed=1, retried=1)
    delivery = outbox.get_delivery(enq.delivery_id)
    assert delivery.settled_recipients == ("ok@example.com", "typo@example.com")
    sink.rcpt_replies = {"typo@example.com": "550 5.1.1 No such user"}
    sink_engine_update_due(outbox)
    assert run_tick(smtp_worker(outbox, sink)) == TickReport(claimed=1, sent=1)
    assert [m.rcpt_tos for m in sink.messages] == [("ok@example.com",), ("grey@example.com",)]
    assert outbox.list_attempts(enq.delivery_id)[-1].refused is None


def test_recipient_refused_for_now_until_attempts_run_out_is_dead_lettered_and_resent_alone(
    outbox: Outbox, sink: SmtpSink
) -> None:
    """Mail that never reached everyone lands in the dead letters; a resend reaches the rest."""
    enq = outbox.enqueue(make_mail(to=["a@example.com", "grey@example.com"]))
    sink.rcpt_replies = {"grey@example.com": "451 4.7.1 Greylisted"}
    transport = SmtpTransport(sink.host, sink.port, security="none", timeout=5.0)
    policy = RetryPolicy(max_attempts=2, base_delay=timedelta(0), max_delay=timedelta(0))
    worker = make_worker(outbox, transport, retry=policy, name="smtp-worker")
    # One tick claims a delivery once; the retry is due at once for the next tick.
    assert run_tick(worker) == TickReport(claimed=1, retried=1)
    assert run_tick(worker) == TickReport(claimed=1, dead_lettered=1)
    delivery = outbox.get_delivery(enq.delivery_id)
    assert delivery.status is Status.DEAD_LETTERED
    # The second attempt went to the greylisted recipient alone, and it refused again.
    assert delivery.last_error == (
        "attempts exhausted (2): 451 RCPT TO: all 1 recipient(s) refused;"
        " first: 451 4.7.1 Greylisted"
    )
    assert delivery.settled_recipients == ("a@example.com",)
    [dead] = outbox.list_dead_letters().items
    assert dead.delivery_id == enq.delivery_id and dead.reason == delivery.last_error
    assert [m.rcpt_tos for m in sink.messages] == [("a@example.com",)]

    sink.rcpt_replies = {}
    outbox.resend(enq.delivery_id)
    assert run_tick(worker) == TickReport(claimed=1, sent=1)
    assert [m.rcpt_tos for m in sink.messages] == [("a@example.com",), ("grey@example.com",)]
    assert outbox.get_delivery(enq.delivery_id).status is Status.SENT


@pytest.mark.parametrize("reply", ["552 5.3.4 Message too big", "554 5.7.1 Rejected as spam"])
def test_5xx_after_data_dead_letters(outbox: Outbox, sink: SmtpSink, reply: str) -> None:
    """A 5xx to the message data is permanent."""
    enq = outbox.enqueue(make_mail())
    sink.data_reply = reply
    assert run_tick(smtp_worker(outbox, sink)).dead_lettered == 1
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert attempt.smtp_code == int(reply[:3])
    assert outbox.get_delivery(enq.delivery_id).status is Status.DEAD_LETTERED


def test_connection_dropped_after_data_is_unknown_and_retried_same_message_id(
    outbox: Outbox, sink: SmtpSink
) -> None:
    """No reply after DATA: outcome unknown, retried, and the retry has the same Message-ID."""
    enq = outbox.enqueue(make_mail())
    sink.drop_after_data = True
    assert run_tick(smtp_worker(outbox, sink)).retried == 1
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert attempt.outcome is Outcome.UNKNOWN
    assert_retrying_in_30s(outbox, enq.delivery_id)
    sink.drop_after_data = False
    sink_engine_update_due(outbox)
    assert run_tick(smtp_worker(outbox, sink)).sent == 1
    assert sink.dropped[0].message_id == sink.messages[0].message_id


def test_accepting_reply_past_8192_bytes_is_unknown_not_dead_lettered(
    outbox: Outbox, sink: SmtpSink
) -> None:
    """A 250 after the message with an over-long line: the server has it; retried, not dropped."""
    enq = outbox.enqueue(make_mail())
    sink.data_reply = "250 2.0.0 Ok: queued as 4Xy " + "x" * 9000
    assert run_tick(smtp_worker(outbox, sink)).retried == 1
    assert len(sink.messages) == 1
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert attempt.outcome is Outcome.UNKNOWN
    assert_retrying_in_30s(outbox, enq.delivery_id)


def test_greeting_line_past_8192_bytes_pauses_without_charging_attempts(
    outbox: Outbox, sink: SmtpSink
) -> None:
    """An over-long greeting line is a server unavailable, not a 5xx that dead-letters the batch."""
    enqueued = outbox.enqueue_many([make_mail() for _ in range(3)])
    sink.greeting = "220 " + "x" * 9000
    assert run_tick(smtp_worker(outbox, sink)).dead_lettered == 0
    attempts = []
    for enq in enqueued:
        delivery = outbox.get_delivery(enq.delivery_id)
        # The one that met the greeting is due again shortly; the others were handed back.
        assert delivery.status in (Status.RETRYING, Status.PENDING)
        assert delivery.attempts == 0
        attempts += outbox.list_attempts(enq.delivery_id)
    assert attempts
    assert {(a.error_class, a.smtp_code) for a in attempts} == {("ServerUnavailable", None)}


def sink_engine_update_due(outbox: Outbox) -> None:
    """Make every retrying delivery due now."""
    with outbox.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE mailoutbox.mail_deliveries SET next_attempt_at = now()"
                " WHERE status = 'retrying'"
            )
        )


def test_reply_slower_than_timeout_is_transient_not_a_hang(outbox: Outbox, sink: SmtpSink) -> None:
    """A server that stalls past the timeout costs one timeout, then the delivery retries."""
    import time

    enq = outbox.enqueue(make_mail())
    sink.delays = {"MAIL": 3.0}
    started = time.monotonic()
    assert run_tick(smtp_worker(outbox, sink, timeout=0.5)).retried == 1
    assert time.monotonic() - started < 3.0
    assert_retrying_in_30s(outbox, enq.delivery_id)


def test_wrong_credentials_dead_letter_and_never_leak_the_password(
    engine: sa.Engine, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """535 on AUTH is permanent; the password appears in no row and no log line."""
    password = "s3cret-Pa55word"
    caplog.set_level(logging.DEBUG)
    with SmtpSink(credentials=("app", "right-password"), auth_required=True) as sink:
        enq = outbox.enqueue(make_mail())
        worker = smtp_worker(outbox, sink, username="app", password=password)
        assert run_tick(worker).dead_lettered == 1
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert attempt.smtp_code == 535
    with engine.connect() as conn:
        dump = conn.execute(
            sa.text(
                "SELECT string_agg(t::text, ' ') FROM ("
                " SELECT row_to_json(d)::text AS t FROM mailoutbox.mail_deliveries d"
                " UNION ALL SELECT row_to_json(a)::text FROM mailoutbox.mail_attempts a"
                " UNION ALL SELECT row_to_json(l)::text FROM mailoutbox.mail_dead_letters l) x"
            )
        ).scalar_one()
    assert password not in dump
    assert password not in caplog.text
    assert password not in repr(worker.transport)


def test_malformed_auth_challenge_dead_letters_nothing(outbox: Outbox) -> None:
    """A server answering AUTH with a challenge that is not base64 pauses sending; no mail lost."""
    with SmtpSink(credentials=("app", "pw"), auth_required=True) as sink:
        sink.auth_reply = "334 abc"
        enqueued = outbox.enqueue_many([make_mail() for _ in range(3)])
        worker = smtp_worker(outbox, sink, username="app", password="pw")
        assert run_tick(worker).dead_lettered == 0
    attempts = []
    for enq in enqueued:
        delivery = outbox.get_delivery(enq.delivery_id)
        assert delivery.status in (Status.RETRYING, Status.PENDING)
        assert delivery.attempts == 0
        attempts += outbox.list_attempts(enq.delivery_id)
    assert attempts
    assert {a.error_class for a in attempts} == {"ServerUnavailable"}


def test_starttls_not_offered_is_refused_under_starttls(outbox: Outbox, sink: SmtpSink) -> None:
    """security='starttls' against a server without STARTTLS sends nothing and dead-letters."""
    enq = outbox.enqueue(make_mail())
    assert run_tick(smtp_worker(outbox, sink, security="starttls")).dead_lettered == 1
    assert sink.messages == []
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert "STARTTLS" in attempt.error


def test_refused_connection_is_transient(outbox: Outbox) -> None:
    """Nobody listening on the port: transient, retried later."""
    enq = outbox.enqueue(make_mail())
    transport = SmtpTransport("127.0.0.1", 1, security="none", timeout=2.0)
    worker = make_worker(outbox, transport, retry=POLICY)
    assert run_tick(worker).retried == 1
    [attempt] = outbox.list_attempts(enq.delivery_id)
    assert attempt.outcome is Outcome.TRANSIENT_FAILURE and attempt.smtp_code is None


def test_info_logs_never_show_a_recipient_address(
    outbox: Outbox, sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    """A server reply quoting the recipient is logged at INFO with the address masked."""
    caplog.set_level(logging.INFO, logger="mailoutbox")
    outbox.enqueue(make_mail(to=["private.person@example.com"]))
    sink.rcpt_replies = {
        "private.person@example.com": "450 4.2.1 <private.person@example.com> mailbox busy"
    }
    assert run_tick(smtp_worker(outbox, sink)).retried == 1
    assert "private.person" not in caplog.text
    assert "@example.com" in caplog.text
