"""Run the async classes behind the sync API, so one test suite covers both.

An event loop runs in a background thread; `SyncOutbox` and `SyncWorker` call
AsyncOutbox/AsyncWorker coroutines on it and wait for the answer. Tests then
use the same code against `Outbox`/`Worker` and against their async twins.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import sqlalchemy as sa

from mailoutbox.aio import AsyncOutbox, AsyncWorker
from mailoutbox.store import Store

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class SyncOutbox:
    """The Outbox API, answered by an AsyncOutbox."""

    is_async = True

    def __init__(self, aoutbox: AsyncOutbox, loop: LoopThread, engine: sa.Engine) -> None:
        self.aoutbox = aoutbox
        self.loop = loop
        # Tests reach around the facade with the sync engine on the same database.
        self.engine = engine
        self.store = Store(aoutbox.tables)
        self.tables = aoutbox.tables
        self.schema = aoutbox.schema

    def enqueue(self, mail: Any, *, connection: Any = None) -> Any:
        if connection is not None:
            raise TypeError("the async outbox takes an AsyncConnection; see tests/test_aio.py")
        return self.loop.run(self.aoutbox.enqueue(mail))

    def enqueue_many(self, mails: Any, *, connection: Any = None) -> Any:
        if connection is not None:
            raise TypeError("the async outbox takes an AsyncConnection; see tests/test_aio.py")
        return self.loop.run(self.aoutbox.enqueue_many(mails))

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.aoutbox, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.loop.run(method(*args, **kwargs))

        return call


class SyncWorker:
    """The Worker API, answered by an AsyncWorker."""

    def __init__(self, aworker: AsyncWorker, loop: LoopThread) -> None:
        self.aworker = aworker
        self.loop = loop

    @property
    def transport(self) -> Any:
        return self.aworker.transport

    @property
    def concurrency(self) -> int:
        return self.aworker.concurrency

    @concurrency.setter
    def concurrency(self, value: int) -> None:
        self.aworker.concurrency = value

    def tick(self) -> Any:
        return self.loop.run(self.aworker.tick())

    def close(self) -> None:
        self.loop.run(self.aworker.aclose())

    def run(self, stop: threading.Event | None = None, *, handle_signals: bool = True) -> None:
        stop = stop or threading.Event()
        astop = self.loop.run(_new_event())
        running = self.loop.submit(self.aworker.run(astop))
        while not running.done():
            if stop.wait(0.05):
                self.loop.loop.call_soon_threadsafe(astop.set)
                break
        running.result()


async def _new_event() -> asyncio.Event:
    return asyncio.Event()


def make_worker(outbox: Any, transport: Any, **kwargs: Any) -> Any:
    """A Worker for an Outbox, or a SyncWorker around an AsyncWorker for a SyncOutbox."""
    from mailoutbox.worker import Worker

    if isinstance(outbox, SyncOutbox):
        return SyncWorker(AsyncWorker(outbox.aoutbox, transport, **kwargs), outbox.loop)
    return Worker(outbox, transport, **kwargs)
