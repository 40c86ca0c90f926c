"""How an AsyncWorker ends: a cancelled run(), aclose() beside a send, a second event loop.

A host stops `run()` by cancelling its task as often as with `stop()` (the
FastAPI example does); either way a mail that was sent is recorded as sent, and
nothing stays leased until another worker sends it again.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mailoutbox import Outbox, Status
from mailoutbox.aio import AsyncOutbox, AsyncWorker
from mailoutbox.transports.base import Envelope
from mailoutbox.transports.memory import MemoryTransport

from .async_bridge import LoopThread
from .conftest import DEFAULT_SENDER, SCHEMA
from .factories import make_mail, wait_until_async


@pytest.fixture
def aoutbox(db_url: sa.URL, loop_thread: LoopThread) -> Iterator[AsyncOutbox]:
    async def make() -> AsyncEngine:
        return create_async_engine(db_url, pool_size=5, max_overflow=0)

    engine = loop_thread.run(make())
    yield AsyncOutbox(engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    loop_thread.run(engine.dispose())


def _slow_transport(seconds: float) -> tuple[MemoryTransport, threading.Event]:
    """A synchronous transport (as SmtpTransport is) whose send takes `seconds`."""
    sending = threading.Event()

    def slow(envelope: Envelope) -> None:
        sending.set()
        time.sleep(seconds)

    return MemoryTransport(slow), sending


def test_cancelling_run_records_the_send_in_flight_and_hands_back_the_rest(
    loop_thread: LoopThread, aoutbox: AsyncOutbox, sync_outbox: Outbox
) -> None:
    """A cancelled run() ends as stop() does: the mail it sent is `sent`, the others due again."""
    sync_outbox.enqueue_many([make_mail() for _ in range(3)])
    transport, sending = _slow_transport(0.5)
    worker = AsyncWorker(aoutbox, transport, concurrency=1, listen=False)

    async def body() -> bool:
        task = asyncio.create_task(worker.run())
        await wait_until_async(sending.is_set, 10, "the send to start")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task.cancelled()

    assert loop_thread.run(body())  # the cancellation still reaches the caller
    [delivered] = transport.sent
    assert sync_outbox.get_delivery(delivered.delivery_id).status is Status.SENT
    counts = sync_outbox.count_by_status()
    assert (counts[Status.SENT], counts[Status.PENDING], counts[Status.SENDING]) == (1, 2, 0)

    # Another worker takes the two handed back at once, and never the delivered one.
    heir = MemoryTransport()
    report = loop_thread.run(AsyncWorker(aoutbox, heir, concurrency=3).tick())
    assert report.sent == 2
    assert {e.delivery_id for e in heir.sent}.isdisjoint({delivered.delivery_id})


def test_a_cancelled_run_waits_for_a_hung_send_no_longer_than_the_lease(
    loop_thread: LoopThread, aoutbox: AsyncOutbox, sync_outbox: Outbox
) -> None:
    """Past the lease another worker may own the mail: the cancelled run() gives up and ends."""
    sync_outbox.enqueue(make_mail())
    sending = threading.Event()

    class HungTransport:
        async def send(self, envelope: Envelope) -> None:
            sending.set()
            await asyncio.Event().wait()

    worker = AsyncWorker(aoutbox, HungTransport(), listen=False, lease=timedelta(seconds=1))

    async def body() -> float:
        task = asyncio.create_task(worker.run())
        await wait_until_async(sending.is_set, 10, "the send to start")
        started = time.monotonic()
        task.cancel()
        await asyncio.gather(asyncio.wait_for(task, 10), return_exceptions=True)
        assert task.cancelled()
        return time.monotonic() - started

    assert loop_thread.run(body()) < 5


def test_aclose_closes_the_transport_only_after_the_sends_in_flight(
    loop_thread: LoopThread, aoutbox: AsyncOutbox, sync_outbox: Outbox
) -> None:
    """No thread is inside send() when close() runs: an SMTP session is never QUIT mid-DATA."""
    sync_outbox.enqueue(make_mail())
    closed_mid_send: list[bool] = []

    class Transport(MemoryTransport):
        def __init__(self) -> None:
            super().__init__(self._slow)
            self.sending = threading.Event()
            self.sent_all = threading.Event()

        def _slow(self, envelope: Envelope) -> None:
            self.sending.set()
            time.sleep(0.5)
            self.sent_all.set()

        def close(self) -> None:
            closed_mid_send.append(self.sending.is_set() and not self.sent_all.is_set())

    transport = Transport()
    worker = AsyncWorker(aoutbox, transport, listen=False)

    async def body() -> int:
        tick = asyncio.create_task(worker.tick())
        await wait_until_async(transport.sending.is_set, 10, "the send to start")
        await worker.aclose()
        return (await tick).sent

    assert loop_thread.run(body()) == 1
    assert closed_mid_send == [False]


def test_one_worker_runs_under_one_event_loop_after_another(
    db_url: sa.URL, sync_outbox: Outbox
) -> None:
    """A worker built once (at import, in a fixture) serves asyncio.run() after asyncio.run()."""
    engine = create_async_engine(db_url)
    outbox = AsyncOutbox(engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    transport = MemoryTransport()
    worker = AsyncWorker(outbox, transport, poll_interval=timedelta(seconds=0.2))

    async def one_run(delivered: int) -> None:
        await outbox.enqueue(make_mail())
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + 10
            while len(transport.sent) < delivered and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # idle: waiting for the next notification or poll
            stop.set()
            await asyncio.wait_for(task, 10)
        finally:
            await engine.dispose()

    asyncio.run(one_run(1))
    asyncio.run(one_run(2))
    assert len(transport.sent) == 2
    assert sync_outbox.count_by_status()[Status.SENT] == 2


def test_a_stop_asked_before_the_task_runs_ends_that_run(
    loop_thread: LoopThread, aoutbox: AsyncOutbox, sync_outbox: Outbox
) -> None:
    """`task = create_task(worker.run()); worker.stop()`: the task has not begun when
    stop() is asked. The stop is kept, so awaiting the task ends (it used to hang
    for ever), and forgotten once that run() is over: the next run delivers."""
    sync_outbox.enqueue(make_mail())
    transport = MemoryTransport()
    worker = AsyncWorker(aoutbox, transport)

    async def start_and_stop() -> None:
        task = asyncio.create_task(worker.run())
        worker.stop()
        await asyncio.wait_for(task, 10)

    loop_thread.run(start_and_stop())
    assert transport.sent == []
    assert sync_outbox.count_by_status()[Status.PENDING] == 1

    async def run_until_sent() -> None:
        task = asyncio.create_task(worker.run())
        await wait_until_async(lambda: bool(transport.sent), 10, "the mail to be sent")
        worker.stop()
        await asyncio.wait_for(task, 10)

    loop_thread.run(run_until_sent())
    assert len(transport.sent) == 1


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() arrived in 3.11")
def test_a_cancelled_error_out_of_an_async_transport_fails_that_delivery_alone(
    loop_thread: LoopThread, aoutbox: AsyncOutbox, sync_outbox: Outbox
) -> None:
    """A CancelledError that an async library leaks, while nobody cancels the worker, is
    the send's failure: it used to lose the batch's record and end run() as cancelled."""
    ids = [r.delivery_id for r in sync_outbox.enqueue_many([make_mail() for _ in range(3)])]
    sent: list[uuid.UUID] = []

    class LeakyTransport:
        async def send(self, envelope: Envelope) -> None:
            if envelope.delivery_id == ids[1]:
                raise asyncio.CancelledError
            sent.append(envelope.delivery_id)

    worker = AsyncWorker(aoutbox, LeakyTransport(), batch_size=3)
    report = loop_thread.run(worker.tick())
    assert (report.claimed, report.sent, report.dead_lettered) == (3, 2, 1)
    assert sorted(sent) == sorted([ids[0], ids[2]])
    assert sync_outbox.get_delivery(ids[1]).status is Status.DEAD_LETTERED


def test_a_system_exit_raised_on_a_send_thread_fails_that_delivery_alone(
    loop_thread: LoopThread, aoutbox: AsyncOutbox, sync_outbox: Outbox
) -> None:
    """A sync transport (run on the worker's send threads) whose library gives up with
    SystemExit: no host is stopping anything there. It used to end tick() unrecorded,
    and the batch's delivered mail went out again after the lease."""
    ids = [r.delivery_id for r in sync_outbox.enqueue_many([make_mail() for _ in range(3)])]

    def handler(envelope: Envelope) -> None:
        if envelope.delivery_id == ids[1]:
            raise SystemExit("library gave up")

    worker = AsyncWorker(aoutbox, MemoryTransport(handler), batch_size=3)
    report = loop_thread.run(worker.tick())
    assert (report.claimed, report.sent, report.dead_lettered) == (3, 2, 1)
    [attempt] = sync_outbox.list_attempts(ids[1])
    assert (attempt.error_class, attempt.error) == ("SystemExit", "library gave up")
