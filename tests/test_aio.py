"""What only the async outbox offers: AsyncConnection/AsyncSession transactions, the loop.

Everything else runs through the shared suite (the `outbox` fixture's async
variant); the FastAPI example is tested end to end with httpx.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from mailoutbox import Outbox, Status
from mailoutbox.aio import AsyncOutbox, AsyncWorker
from mailoutbox.transports.base import Envelope
from mailoutbox.transports.memory import MemoryTransport

from .async_bridge import LoopThread
from .factories import make_mail, row_counts, wait_until_async

orders = sa.Table("orders", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))


@pytest.fixture
def aengine(db_url: sa.URL, engine: sa.Engine, loop_thread: LoopThread) -> Iterator[AsyncEngine]:
    orders.create(engine)

    async def make() -> AsyncEngine:
        return create_async_engine(db_url, pool_size=20, max_overflow=0)

    async_engine = loop_thread.run(make())
    yield async_engine
    loop_thread.run(async_engine.dispose())


@pytest.fixture
def aoutbox(aengine: AsyncEngine) -> AsyncOutbox:
    return AsyncOutbox(aengine, default_sender="shop@example.com")


def test_enqueue_on_async_connection_commits_with_the_caller(
    loop_thread: LoopThread, aengine: AsyncEngine, aoutbox: AsyncOutbox, sync_outbox: Outbox
) -> None:
    """Mail and business row commit together on the caller's AsyncConnection."""

    async def body() -> Any:
        async with aengine.begin() as conn:
            await conn.execute(orders.insert().values(id=1))
            return await aoutbox.enqueue(make_mail(), connection=conn)

    result = loop_thread.run(body())
    assert sync_outbox.get_delivery(result.delivery_id).status is Status.PENDING


def test_rolled_back_async_transaction_leaves_no_mail(
    loop_thread: LoopThread, aengine: AsyncEngine, aoutbox: AsyncOutbox, engine: sa.Engine
) -> None:
    """An AsyncConnection rollback takes the mail with it."""

    async def body() -> None:
        async with aengine.connect() as conn:
            trans = await conn.begin()
            await conn.execute(orders.insert().values(id=1))
            await aoutbox.enqueue_many([make_mail(), make_mail()], connection=conn)
            await trans.rollback()

    loop_thread.run(body())
    assert set(row_counts(engine).values()) == {0}


def test_enqueue_joins_an_async_session(
    loop_thread: LoopThread, aengine: AsyncEngine, aoutbox: AsyncOutbox, sync_outbox: Outbox
) -> None:
    """An AsyncSession can be passed; its commit or rollback decides."""

    async def body() -> None:
        async with AsyncSession(aengine) as session:
            await aoutbox.enqueue(make_mail(idempotency_key="kept"), connection=session)
            await session.commit()
        async with AsyncSession(aengine) as session:
            await aoutbox.enqueue(make_mail(idempotency_key="dropped"), connection=session)
            await session.rollback()

    loop_thread.run(body())
    page = sync_outbox.list_deliveries()
    assert [d.idempotency_key for d in page.items] == ["kept"]


def test_async_duplicate_keeps_callers_transaction_usable(
    loop_thread: LoopThread, aengine: AsyncEngine, aoutbox: AsyncOutbox, engine: sa.Engine
) -> None:
    """A duplicate enqueue inside the caller's async transaction lets its other writes commit."""

    async def body() -> bool:
        await aoutbox.enqueue(make_mail(idempotency_key="dup"))
        async with aengine.begin() as conn:
            dup = await aoutbox.enqueue(make_mail(idempotency_key="dup"), connection=conn)
            await conn.execute(orders.insert().values(id=5))
        return dup.created

    assert loop_thread.run(body()) is False
    with engine.connect() as conn:
        assert conn.execute(sa.select(orders.c.id)).scalars().all() == [5]


def test_sixteen_concurrent_async_enqueues_of_one_key_create_one(
    loop_thread: LoopThread, aoutbox: AsyncOutbox, engine: sa.Engine
) -> None:
    """Racing coroutines enqueueing one key: one delivery, one id for all."""

    async def body() -> list[Any]:
        return await asyncio.gather(
            *(aoutbox.enqueue(make_mail(idempotency_key="race")) for _ in range(16))
        )

    results = loop_thread.run(body())
    assert len({r.delivery_id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert row_counts(engine)["mail_deliveries"] == 1


def test_sync_transport_never_blocks_the_event_loop(
    loop_thread: LoopThread, aoutbox: AsyncOutbox, sync_outbox: Outbox
) -> None:
    """A slow synchronous transport runs off the loop: other tasks keep their pace."""
    sync_outbox.enqueue_many([make_mail() for _ in range(4)])
    # A send that blocked the loop would stall the heartbeat for the whole second.
    transport = MemoryTransport(lambda e: time.sleep(1.0))
    worker = AsyncWorker(aoutbox, transport, concurrency=4)

    async def body() -> float:
        lag = 0.0

        async def heartbeat() -> None:
            nonlocal lag
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                lag = max(lag, time.monotonic() - before - 0.01)

        beat = asyncio.create_task(heartbeat())
        report = await worker.tick()
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
        assert report.sent == 4
        return lag

    assert loop_thread.run(body()) < 0.5


def test_async_transport_is_awaited(
    loop_thread: LoopThread, aoutbox: AsyncOutbox, sync_outbox: Outbox
) -> None:
    """A transport whose send is a coroutine is awaited on the loop."""
    sync_outbox.enqueue_many([make_mail() for _ in range(3)])
    seen: list[Envelope] = []

    class AsyncTransport:
        async def send(self, envelope: Envelope) -> None:
            await asyncio.sleep(0.01)
            seen.append(envelope)

    report = loop_thread.run(AsyncWorker(aoutbox, AsyncTransport()).tick())
    assert report.sent == 3 and len(seen) == 3


def test_fastapi_example_commits_order_and_mail_together(
    loop_thread: LoopThread, aengine: AsyncEngine, engine: sa.Engine, sync_outbox: Outbox
) -> None:
    """POST /orders writes the order and its mail; a failed request leaves neither."""
    from examples.fastapi_app import create_app

    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE orders"))  # the fixture's, of another shape
    transport = MemoryTransport()
    app = create_app(aengine, transport)

    async def body() -> tuple[httpx.Response, httpx.Response]:
        async with app.router.lifespan_context(app):  # creates the orders table
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
            async with client:
                ok = await client.post("/orders", json={"email": "a@example.com", "item": "mug"})
                bad = await client.post(
                    "/orders", json={"email": "b@example.com", "item": "out-of-stock"}
                )
                await wait_until_async(lambda: bool(transport.sent), 10, "the order's mail")
            return ok, bad

    ok, bad = loop_thread.run(body())
    assert ok.status_code == 201 and bad.status_code == 409
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT email FROM orders")).scalars().all() == [
            "a@example.com"
        ]
    [delivery] = sync_outbox.list_deliveries().items
    assert str(delivery.delivery_id) == ok.json()["delivery_id"]
    [envelope] = transport.sent
    assert envelope.recipients == ("a@example.com",)
    assert b"Subject: Order 1 confirmed" in envelope.message


def test_fastapi_example_answers_only_once_the_order_and_mail_are_committed(
    loop_thread: LoopThread, aengine: AsyncEngine, engine: sa.Engine, sync_outbox: Outbox
) -> None:
    """A COMMIT that fails (here a deferred check) must not follow a 201: the example's
    transaction used to be a dependency's, committed after the response was sent."""
    from examples.fastapi_app import create_app

    app = create_app(aengine)

    async def body() -> httpx.Response:
        async with app.router.lifespan_context(app):
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                base_url="http://t",
            )
            async with client:
                return await client.post("/orders", json={"email": "c@example.com", "item": "boom"})

    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE orders"))  # the fixture's, of another shape
        conn.execute(sa.text("CREATE TABLE orders (id serial PRIMARY KEY, email text, item text)"))
        conn.execute(
            sa.text(
                "CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN IF NEW.item = 'boom' THEN RAISE EXCEPTION 'refused at commit'; END IF;"
                " RETURN NULL; END $$"
            )
        )
        conn.execute(
            sa.text(
                "CREATE CONSTRAINT TRIGGER refuse_boom AFTER INSERT ON orders"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_boom()"
            )
        )
    response = loop_thread.run(body())
    assert response.status_code == 500
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM orders")).scalar_one() == 0
    assert sync_outbox.list_deliveries().total == 0
