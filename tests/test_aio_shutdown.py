"""How an AsyncWorker ends: aclose() beside a send, a second event loop."""

from __future__ import annotations

import asyncio
import threading
import time
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
from .factories import make_mail


@pytest.fixture
def aoutbox(db_url: sa.URL, loop_thread: LoopThread) -> Iterator[AsyncOutbox]:
    async def make() -> AsyncEngine:
        return create_async_engine(db_url, pool_size=5, max_overflow=0)

    engine = loop_thread.run(make())
    yield AsyncOutbox(engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    loop_thread.run(engine.dispose())


async def _until(event: threading.Event) -> None:
    deadline = time.monotonic() + 10
    while not event.is_set():
        assert time.monotonic() < deadline, "the send never started"
        await asyncio.sleep(0.01)


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
        await _until(transport.sending)
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
