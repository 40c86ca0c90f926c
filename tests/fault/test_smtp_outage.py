"""Scenario 5: the SMTP server goes away for a while and comes back.

Deliveries fail with transient errors while it is down, retry with exponential
backoff and full jitter, and are all delivered, once each, after it returns.
The test prints what the attempts look like. An unreachable server pauses the
worker instead of charging each delivery an attempt per try, so an outage
longer than the retry budget dead-letters nothing (the second test).
"""

from __future__ import annotations

import collections
import itertools
import math
import statistics
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from mailoutbox import Outbox, Status
from mailoutbox.retry import RetryPolicy
from mailoutbox.transports.smtp import SmtpTransport
from mailoutbox.worker import Worker

from ..smtp_sink import SmtpSink
from .harness import (
    check_all_received,
    counts,
    duplicates,
    enqueue,
    figures,
    received,
    rows,
    wait_for,
)

DELIVERIES = 100
OUTAGE = 6.0


class SinkOnPort(SmtpSink):
    """The sink again, on the port the worker's transport points at.

    SmtpSink binds an ephemeral port and, on start, waits until no connection is
    open; here the worker connects as soon as the port listens, so neither fits.
    """

    def __init__(self, port: int) -> None:
        super().__init__()
        self._controller.port = port

    def start(self) -> SinkOnPort:
        self._controller.start()
        self._started = True
        self.port = self._controller.port
        return self


def sink_on(port: int) -> SmtpSink:
    return SinkOnPort(port).start()


class Running:
    """Workers running `run()` in threads of the test process; stopped and joined on exit."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def __call__(self, worker: Worker) -> None:
        thread = threading.Thread(target=worker.run, args=(self.stop,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive(), "the worker did not stop"


@pytest.fixture
def run() -> Iterator[Running]:
    running = Running()
    yield running
    running.join()


def attempt_history(engine: sa.Engine) -> dict[object, list[tuple[int, str, float, str]]]:
    """Per delivery: (attempt_no, outcome, seconds since the delivery was created, error)."""
    history: dict[object, list[tuple[int, str, float, str]]] = collections.defaultdict(list)
    for delivery_id, no, outcome, offset, error in rows(
        engine,
        "SELECT a.delivery_id, a.attempt_no, a.outcome,"
        " extract(epoch FROM a.started_at - d.created_at)::float, a.error"
        " FROM mailoutbox.mail_attempts a JOIN mailoutbox.mail_deliveries d USING (delivery_id)"
        " ORDER BY a.delivery_id, a.attempt_no",
    ):
        history[delivery_id].append((no, outcome, offset, error))
    return history


@pytest.mark.slow
def test_deliveries_retry_through_an_outage_and_arrive_once(
    engine: sa.Engine, outbox: Outbox, sink: SmtpSink, run: Running
) -> None:
    port = sink.port
    ids = enqueue(outbox, DELIVERIES)
    sink.stop()
    policy = RetryPolicy(
        max_attempts=30, base_delay=timedelta(seconds=0.25), max_delay=timedelta(seconds=2)
    )
    transport = SmtpTransport("127.0.0.1", port, security="none", timeout=2.0)
    worker = Worker(
        outbox,
        transport,
        retry=policy,
        batch_size=50,
        concurrency=4,
        poll_interval=timedelta(seconds=0.1),
        name="outage",
    )
    down_at = time.monotonic()
    run(worker)
    time.sleep(OUTAGE)
    back = sink_on(port)
    try:
        back_at = time.monotonic()
        first = wait_for(lambda: len(back.messages) > 0, 30, "a delivery after the outage")
        wait_for(lambda: counts(engine)[Status.SENT] == DELIVERIES, 60, "every delivery sent")
        all_in = time.monotonic() - back_at
        got = received(back)
    finally:
        back.stop()
    history = attempt_history(engine)
    failed = [sum(o != "sent" for _, o, _, _ in h) for h in history.values()]
    during = sum(failed)
    gaps = [
        t1 - t0 for h in history.values() for (_, _, t0, _), (_, _, t1, _) in itertools.pairwise(h)
    ]
    sample = next(iter(history.values()))
    print("\none delivery's attempts (no, outcome, seconds after enqueue, error):")
    for no, outcome, offset, error in sample:
        print(f"  {no:2d} {outcome:18s} {offset:6.2f}s {error[:90]}")
    lost = check_all_received(got, ids)
    figures(
        "smtp outage",
        deliveries=DELIVERIES,
        outage_seconds=back_at - down_at,
        failed_attempts=during,
        failed_attempts_per_second=during / (back_at - down_at),
        failed_per_delivery_min=min(failed),
        failed_per_delivery_median=statistics.median(failed),
        failed_per_delivery_max=max(failed),
        median_gap_seconds=statistics.median(gaps),
        first_delivery_after_return_seconds=first,
        all_delivered_after_return_seconds=all_in,
        duplicates=duplicates(got),
        lost=lost,
    )
    assert lost == 0 and duplicates(got) == 0
    assert counts(engine)[Status.DEAD_LETTERED] == 0
    # An unreachable server pauses the worker (1 s doubling, jittered) instead of
    # charging attempts: at most `concurrency` sends fail per pause, and no delivery
    # spent any of its attempts on the outage.
    pauses = 1 + math.ceil(math.log2(1 + (back_at - down_at) / 0.8))
    assert during <= pauses * worker.concurrency
    charged = rows(
        engine, "SELECT max(attempts) FROM mailoutbox.mail_deliveries WHERE status = 'sent'"
    )
    assert charged == [(1,)]
    errors = {
        (outcome, error.split(":")[0])
        for h in history.values()
        for _, outcome, _, error in h
        if outcome != "sent"
    }
    assert errors == {("transient_failure", "connect")}


@pytest.mark.slow
def test_an_outage_longer_than_the_retry_budget_dead_letters_nothing(
    engine: sa.Engine, outbox: Outbox, sink: SmtpSink, run: Running
) -> None:
    port = sink.port
    enqueue(outbox, 20)
    sink.stop()
    policy = RetryPolicy(
        max_attempts=3, base_delay=timedelta(seconds=0.2), max_delay=timedelta(seconds=0.4)
    )
    worker = Worker(
        outbox,
        SmtpTransport("127.0.0.1", port, security="none", timeout=2.0),
        retry=policy,
        batch_size=20,
        concurrency=4,
        poll_interval=timedelta(seconds=0.1),
        name="outage",
    )
    run(worker)
    time.sleep(3.0)
    back = sink_on(port)
    try:
        # Everything should now go out (a paused worker may take a while to look again).
        wait_for(
            lambda: counts(engine)[Status.SENT] == 20 or counts(engine)[Status.DEAD_LETTERED] > 0,
            60,
            "the backlog to be sent",
        )
        statuses = counts(engine)
    finally:
        back.stop()
    figures("outage vs retry budget", **{s.value: n for s, n in statuses.items() if n})
    assert statuses[Status.DEAD_LETTERED] == 0
    assert statuses[Status.SENT] == 20
