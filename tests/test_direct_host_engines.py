"""The outbox's own transactions on engines a host has set up its own way (direct.py).

An engine made with isolation_level="AUTOCOMMIT" stays autocommit for the
host; an engine whose `checkout` event runs SQL (a tenant for row-level
security, a search_path) hands out connections already in a transaction, and
the outbox works in that transaction as SQLAlchemy's engine.begin() would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from mailoutbox import MemoryTransport, Outbox, SchemaNotMigrated, Status, Worker

from .conftest import DEFAULT_SENDER, SCHEMA
from .factories import make_mail, row_counts, running, wait_until

host_rows = sa.Table("host_rows", sa.MetaData(), sa.Column("n", sa.Integer))


def set_tenant_on_checkout(engine: sa.Engine) -> None:
    """Per-checkout session setup on the DBAPI connection, as row-level-security hosts do."""

    @sa.event.listens_for(engine, "checkout")
    def set_tenant(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("SELECT set_config('app.tenant', 'acme', false)")
        cursor.close()


@pytest.fixture
def autocommit_engine(db_url: sa.URL, engine: sa.Engine) -> Iterator[sa.Engine]:
    """An AUTOCOMMIT engine of one connection, so the outbox and the host share it."""
    host_rows.create(engine)
    autocommit = sa.create_engine(db_url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=0)
    yield autocommit
    autocommit.dispose()


@pytest.fixture
def tenant_engine(db_url: sa.URL) -> Iterator[sa.Engine]:
    tenant = sa.create_engine(db_url, pool_size=2, max_overflow=0)
    set_tenant_on_checkout(tenant)
    yield tenant
    tenant.dispose()


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


def test_an_enqueue_on_a_connection_set_up_at_checkout_commits(
    tenant_engine: sa.Engine, engine: sa.Engine
) -> None:
    """enqueue() and enqueue_many() without connection= commit in the checkout's transaction."""
    outbox = Outbox(tenant_engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    assert outbox.enqueue(make_mail()).created
    assert all(e.created for e in outbox.enqueue_many([make_mail(), make_mail()]))
    assert row_counts(engine)["mail_deliveries"] == 3  # committed: seen from elsewhere


def test_a_worker_delivers_through_connections_set_up_at_checkout(
    tenant_engine: sa.Engine, sync_outbox: Outbox
) -> None:
    """Claim and record work on connections the host's checkout event left in a transaction."""
    outbox = Outbox(tenant_engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    enqueued = outbox.enqueue(make_mail())
    transport = MemoryTransport()
    worker = Worker(outbox, transport)
    try:
        assert worker.tick().sent == 1
    finally:
        worker.close()
    assert len(transport.sent) == 1
    assert sync_outbox.get_delivery(enqueued.delivery_id).status is Status.SENT


def test_a_running_worker_listens_through_a_connection_set_up_at_checkout(
    tenant_engine: sa.Engine, sync_outbox: Outbox
) -> None:
    """run()'s LISTEN connection comes from the same pool: it failed to switch to
    autocommit inside the checkout's transaction, and the loop retried for ever,
    sending nothing."""
    outbox = Outbox(tenant_engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    transport = MemoryTransport()
    worker = Worker(outbox, transport, poll_interval=timedelta(seconds=30))
    with running(worker):
        time.sleep(0.3)  # the first tick has found nothing; the worker now waits on LISTEN
        enqueued = outbox.enqueue(make_mail())
        wait_until(lambda: len(transport.sent) == 1, 10, "the notified worker to send")
    assert sync_outbox.get_delivery(enqueued.delivery_id).status is Status.SENT


def test_a_failed_enqueue_on_a_connection_set_up_at_checkout_is_a_sqlalchemy_error(
    tenant_engine: sa.Engine,
) -> None:
    """Errors still come out as SQLAlchemy's (here mapped to SchemaNotMigrated), never psycopg's."""
    elsewhere = Outbox(tenant_engine, schema="not_migrated", default_sender=DEFAULT_SENDER)
    with pytest.raises(SchemaNotMigrated) as failed:
        elsewhere.enqueue(make_mail())
    assert isinstance(failed.value.__cause__, sa.exc.ProgrammingError)
    outbox = Outbox(tenant_engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    assert outbox.enqueue(make_mail()).created  # the connection was rolled back, not spoiled
