"""The async outbox on an engine whose `checkout` event runs SQL (a tenant, a search_path).

Such a connection arrives in a transaction; the outbox's own work joins it and
commits, as AsyncEngine.begin() would, instead of failing to switch it to
autocommit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mailoutbox import Outbox, Status
from mailoutbox.aio import AsyncOutbox, AsyncWorker
from mailoutbox.transports.memory import MemoryTransport

from .async_bridge import LoopThread
from .conftest import DEFAULT_SENDER, SCHEMA
from .factories import make_mail, row_counts, wait_until_async
from .test_direct_host_engines import set_tenant_on_checkout


@pytest.fixture
def tenant_aoutbox(db_url: sa.URL, loop_thread: LoopThread) -> Iterator[AsyncOutbox]:
    async def make() -> AsyncEngine:
        return create_async_engine(db_url, pool_size=5, max_overflow=0)

    engine = loop_thread.run(make())
    set_tenant_on_checkout(engine.sync_engine)
    yield AsyncOutbox(engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    loop_thread.run(engine.dispose())


def test_an_async_enqueue_on_a_connection_set_up_at_checkout_commits(
    loop_thread: LoopThread, tenant_aoutbox: AsyncOutbox, engine: sa.Engine
) -> None:
    """enqueue() and enqueue_many() without connection= commit in the checkout's transaction."""

    async def body() -> None:
        await tenant_aoutbox.enqueue(make_mail())
        await tenant_aoutbox.enqueue_many([make_mail(), make_mail()])

    loop_thread.run(body())
    assert row_counts(engine)["mail_deliveries"] == 3


def test_an_async_worker_delivers_through_connections_set_up_at_checkout(
    loop_thread: LoopThread, tenant_aoutbox: AsyncOutbox, sync_outbox: Outbox
) -> None:
    """run(), LISTEN included, claims, sends and records on such connections."""
    transport = MemoryTransport()
    worker = AsyncWorker(tenant_aoutbox, transport)

    async def body() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        await asyncio.sleep(0.3)  # listening by now: the enqueue below wakes the worker
        await tenant_aoutbox.enqueue(make_mail())
        await wait_until_async(lambda: bool(transport.sent), 10, "the mail to be sent")
        stop.set()
        await asyncio.wait_for(task, 10)

    loop_thread.run(body())
    [envelope] = transport.sent
    assert sync_outbox.get_delivery(envelope.delivery_id).status is Status.SENT
