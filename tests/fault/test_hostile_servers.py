"""Scenario 7: mislabelled and slow SMTP servers.

- A server that answers 4xx forever (at MAIL, RCPT or after the message) ends in
  `dead_lettered` after max attempts, or after max age, and is not retried after.
- A server that trickles its reply (every byte inside the socket timeout, the
  reply never ending) costs a timeout, not a hung worker (RELIABILITY.md,
  finding F1).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa

from mailoutbox import Outbox, Status
from mailoutbox.retry import RetryPolicy
from mailoutbox.transports.smtp import SmtpTransport
from mailoutbox.worker import Worker

from ..smtp_sink import SmtpSink
from .harness import counts, enqueue, figures, rows, wait_for
from .trickle_server import STAGES, TrickleServer

REPLIES = {
    "MAIL": ("mail_reply", "451 4.3.0 Try again later"),
    "RCPT": ("rcpt_replies", "452 4.2.2 Mailbox full"),
    "end of DATA": ("data_reply", "421 4.7.0 Come back tomorrow"),
}


def run_until(worker: Worker, condition: Callable[[], bool], timeout: float) -> float:
    """Run the worker in a thread until `condition()`; return the seconds it took."""
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        return wait_for(condition, timeout, "the condition")
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


@pytest.mark.parametrize("stage", list(REPLIES))
def test_4xx_forever_ends_dead_lettered_after_max_attempts(
    stage: str, engine: sa.Engine, outbox: Outbox, sink: SmtpSink
) -> None:
    attribute, reply = REPLIES[stage]
    setattr(sink, attribute, {"user0@example.com": reply} if attribute == "rcpt_replies" else reply)
    [delivery_id] = enqueue(outbox, 1)
    worker = Worker(
        outbox,
        SmtpTransport(sink.host, sink.port, security="none", timeout=2.0),
        retry=RetryPolicy(
            max_attempts=5, base_delay=timedelta(seconds=0.05), max_delay=timedelta(seconds=0.2)
        ),
        poll_interval=timedelta(seconds=0.05),
        name="hostile",
    )
    took = run_until(worker, lambda: counts(engine)[Status.DEAD_LETTERED] == 1, 30)
    time.sleep(0.5)  # would a retry loop go on?
    attempts = outbox.list_attempts(delivery_id)
    delivery = outbox.get_delivery(delivery_id)
    figures(
        f"4xx forever at {stage}",
        attempts=len(attempts),
        seconds_to_dead_letter=took,
        last_error=delivery.last_error[:80],
    )
    assert delivery.status is Status.DEAD_LETTERED
    assert len(attempts) == 5
    code = int(reply[:3])
    assert {(a.outcome.value, a.smtp_code) for a in attempts} == {("transient_failure", code)}
    assert delivery.last_error.startswith("attempts exhausted (5)")
    assert len(sink.messages) == 0


def test_4xx_forever_ends_dead_lettered_after_max_age(
    engine: sa.Engine, outbox: Outbox, sink: SmtpSink
) -> None:
    sink.mail_reply = "451 4.3.0 Try again later"
    [delivery_id] = enqueue(outbox, 1)
    worker = Worker(
        outbox,
        SmtpTransport(sink.host, sink.port, security="none", timeout=2.0),
        retry=RetryPolicy(
            max_attempts=10_000,
            base_delay=timedelta(seconds=0.05),
            max_delay=timedelta(seconds=0.2),
            max_age=timedelta(seconds=2),
        ),
        poll_interval=timedelta(seconds=0.05),
        name="hostile",
    )
    took = run_until(worker, lambda: counts(engine)[Status.DEAD_LETTERED] == 1, 30)
    delivery = outbox.get_delivery(delivery_id)
    age = rows(
        engine,
        "SELECT extract(epoch FROM dead_lettered_at - created_at)::float"
        " FROM mailoutbox.mail_deliveries",
    )[0][0]
    attempts = len(outbox.list_attempts(delivery_id))
    figures(
        "4xx forever, max age 2s", attempts=attempts, age_at_dead_letter_seconds=age, seconds=took
    )
    assert "max age exceeded" in delivery.last_error
    assert 2.0 <= age < 4.0
    assert attempts < 100


@pytest.mark.parametrize("stage", STAGES)
def test_a_trickling_server_costs_a_timeout_not_a_hung_worker(
    stage: str, engine: sa.Engine, outbox: Outbox
) -> None:
    [delivery_id] = enqueue(outbox, 1)
    with TrickleServer(stage) as server:
        worker = Worker(
            outbox,
            SmtpTransport(server.host, server.port, security="none", timeout=1.0),
            retry=RetryPolicy(max_attempts=3, base_delay=timedelta(0), max_delay=timedelta(0)),
            name="trickled",
        )
        done = threading.Event()

        def tick() -> None:
            worker.tick()
            done.set()

        thread = threading.Thread(target=tick, daemon=True)
        start = time.monotonic()
        thread.start()
        try:
            # The timeout is 1 s; allow for connect + EHLO + MAIL + RCPT + DATA each.
            finished = done.wait(5.0)
            took = time.monotonic() - start
        finally:
            server.stop()  # unblocks a hung send, so the thread ends either way
            thread.join(30)
            worker.close()
    attempts = outbox.list_attempts(delivery_id)
    figures(
        f"trickling server at {stage}",
        tick_returned=finished,
        seconds=took,
        attempts=[(a.outcome.value, a.error[:60]) for a in attempts],
    )
    assert finished, "the worker hung on a server that never finishes its reply"
