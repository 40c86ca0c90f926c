"""Small builders shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa

from mailoutbox import Mail, Worker

_keys = itertools.count()


def make_mail(**overrides: Any) -> Mail:
    """A valid text mail with a unique idempotency key unless one is given."""
    values: dict[str, Any] = {
        "template_id": "welcome",
        "idempotency_key": f"key-{next(_keys)}",
        "to": ["alice@example.com"],
        "subject": "Welcome",
        "text": "Hello Alice",
    }
    values.update(overrides)
    return Mail(**values)


def row_counts(engine: sa.Engine, schema: str = "mailoutbox") -> dict[str, int]:
    """Rows in each outbox table."""
    tables = (
        "mail_deliveries",
        "mail_payloads",
        "mail_recipients",
        "mail_attempts",
        "mail_dead_letters",
    )
    with engine.connect() as conn:
        return {
            t: conn.execute(sa.text(f'SELECT count(*) FROM "{schema}".{t}')).scalar_one()
            for t in tables
        }


@contextlib.contextmanager
def running(worker: Worker) -> Iterator[None]:
    """`worker.run()` on a thread for the block; stopped, and checked to have ended, after."""
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, kwargs={"stop": stop, "handle_signals": False})
    runner.start()
    try:
        yield
    finally:
        stop.set()
        runner.join(10)
    assert not runner.is_alive()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def wait_until_async(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_until inside an event loop: the loop goes on running while it polls."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
