"""The outbox's own transactions on engines a host has set up its own way (direct.py).

An engine made with isolation_level="AUTOCOMMIT" stays autocommit for the host.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from mailoutbox import MemoryTransport, Outbox, Worker

from .conftest import DEFAULT_SENDER, SCHEMA
from .factories import make_mail

host_rows = sa.Table("host_rows", sa.MetaData(), sa.Column("n", sa.Integer))


@pytest.fixture
def autocommit_engine(db_url: sa.URL, engine: sa.Engine) -> Iterator[sa.Engine]:
    """An AUTOCOMMIT engine of one connection, so the outbox and the host share it."""
    host_rows.create(engine)
    autocommit = sa.create_engine(db_url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=0)
    yield autocommit
    autocommit.dispose()


def _host_rows(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(host_rows)).scalar_one())


def test_an_autocommit_engine_still_autocommits_the_hosts_writes_after_the_outbox_used_it(
    autocommit_engine: sa.Engine, engine: sa.Engine
) -> None:
    """After an enqueue and a worker's tick, a host write without commit() is kept."""
    outbox = Outbox(autocommit_engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    outbox.enqueue_many([make_mail(), make_mail()])
    worker = Worker(outbox, MemoryTransport(), concurrency=1)
    try:
        assert worker.tick().sent == 2
    finally:
        worker.close()

    with autocommit_engine.connect() as conn:
        conn.execute(host_rows.insert().values(n=1))  # autocommit: no commit() needed
    assert _host_rows(engine) == 1
