"""A FastAPI service that writes an order and enqueues its confirmation in one transaction.

Run it (with a migrated database; the app creates its `orders` table at start-up):

    pip install uvicorn
    DATABASE_URL=postgresql+psycopg://app@localhost/app uvicorn examples.fastapi_app:app

The order row and the mail commit together or not at all; a worker (here an
AsyncWorker started with the app, or a `mailoutbox worker` process) delivers the
mail once the transaction commits. The transaction is the handler's own, not a
dependency's: FastAPI runs a dependency's code after `yield` once the response has
been sent, so a commit that failed there would follow a 201 for an order (and a
mail) that do not exist.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mailoutbox import Mail
from mailoutbox.aio import AsyncOutbox, AsyncWorker
from mailoutbox.transports.base import Transport

metadata = sa.MetaData()
orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("item", sa.Text, nullable=False),
)


class OrderIn(BaseModel):
    email: str
    item: str


def create_app(
    engine: AsyncEngine, transport: Transport | None = None, *, sender: str = "shop@example.com"
) -> FastAPI:
    """The app; with a transport it also runs an AsyncWorker for its lifetime."""
    outbox = AsyncOutbox(engine, default_sender=sender)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        worker_task = None
        if transport is not None:
            worker = AsyncWorker(outbox, transport)
            worker_task = asyncio.create_task(worker.run())
        try:
            yield
        finally:
            if worker_task is not None:
                # Cancelling ends the worker as worker.stop() does: the sends in flight
                # finish and are recorded, the deliveries not yet begun are handed back.
                worker_task.cancel()
                await asyncio.gather(worker_task, return_exceptions=True)

    app = FastAPI(lifespan=lifespan)

    @app.post("/orders", status_code=201)
    async def place_order(order: OrderIn) -> dict[str, Any]:
        # Committed when the block ends, before the response; an exception (the
        # HTTPException below, or the COMMIT failing) rolls back the order and its mail.
        async with engine.begin() as conn:
            order_id = (
                await conn.execute(
                    orders.insert()
                    .values(email=order.email, item=order.item)
                    .returning(orders.c.id)
                )
            ).scalar_one()
            if order.item == "out-of-stock":
                # Raising rolls back the order *and* the mail enqueued with it.
                await outbox.enqueue(
                    Mail(
                        template_id="order-confirmation",
                        idempotency_key=f"order-{order_id}",
                        to=[order.email],
                        subject="never sent",
                        text="-",
                    ),
                    connection=conn,
                )
                raise HTTPException(status_code=409, detail="out of stock")
            enqueued = await outbox.enqueue(
                Mail(
                    template_id="order-confirmation",
                    idempotency_key=f"order-{order_id}",
                    to=[order.email],
                    subject=f"Order {order_id} confirmed",
                    text=f"Thanks for ordering {order.item}.",
                ),
                connection=conn,
            )
        return {"order_id": order_id, "delivery_id": str(enqueued.delivery_id)}

    return app


# For `uvicorn examples.fastapi_app:app`: no connection is made until a request comes in.
# Delivery runs in a separate `mailoutbox worker` process here; pass a transport to
# create_app to run an AsyncWorker inside the service instead.
app = create_app(
    create_async_engine(
        os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1/postgres")
    )
)
