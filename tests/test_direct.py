"""The outbox's own transactions run on psycopg directly (direct.py); SQLAlchemy's duties hold.

Errors arrive as SQLAlchemy exceptions without the mail in their text, a
connection lost mid-statement leaves the pool, and a connection lent back to
the pool is transactional again for the host.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from mailoutbox import NullTransport, Outbox, SchemaNotMigrated, Status, Worker
from mailoutbox.direct import direct
from mailoutbox.schema import tables_for

from .conftest import DEFAULT_SENDER, SCHEMA
from .factories import make_mail, row_counts


@pytest.fixture
def one_conn_engine(db_url: sa.URL) -> Iterator[sa.Engine]:
    """A pool of one connection, so every checkout is the same connection until it is lost."""
    engine = sa.create_engine(db_url, pool_size=1, max_overflow=0)
    yield engine
    engine.dispose()


def _backend_pid(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def _terminate(engine: sa.Engine, pid: int) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT pg_terminate_backend(%(pid)s)", {"pid": pid})


def test_a_lost_connection_fails_one_enqueue_and_the_next_one_reconnects(
    one_conn_engine: sa.Engine, engine: sa.Engine
) -> None:
    """The dead connection is invalidated, so the pool does not lend it again."""
    outbox = Outbox(one_conn_engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    outbox.enqueue(make_mail())
    _terminate(engine, _backend_pid(one_conn_engine))

    with pytest.raises(sa.exc.OperationalError) as failed:
        outbox.enqueue(make_mail(to=["lost@example.com"]))
    assert failed.value.connection_invalidated
    assert failed.value.orig is not None

    created = outbox.enqueue(make_mail())
    assert created.created
    assert row_counts(engine)["mail_deliveries"] == 2


def test_one_lost_connection_retires_every_connection_the_pool_held_then(
    db_url: sa.URL, engine: sa.Engine
) -> None:
    """As SQLAlchemy does: a disconnect marks the whole pool stale, not just one connection.

    A database restart, a failover or an idle timeout ends every pooled connection
    at once; the outbox then pays one failed statement, not one per connection
    the pool still lends out.
    """
    pooled = sa.create_engine(db_url, pool_size=3, max_overflow=0)
    try:
        outbox = Outbox(pooled, schema=SCHEMA, default_sender=DEFAULT_SENDER)
        held = [pooled.connect() for _ in range(3)]
        pids = [int(c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()) for c in held]
        for conn in held:
            conn.close()
        for pid in pids:
            _terminate(engine, pid)

        with pytest.raises(sa.exc.OperationalError) as failed:
            outbox.enqueue(make_mail(to=["lost@example.com"]))
        assert failed.value.connection_invalidated
        assert outbox.enqueue(make_mail()).created
        assert outbox.enqueue(make_mail()).created
        assert _backend_pid(pooled) not in pids
    finally:
        pooled.dispose()
    assert row_counts(engine)["mail_deliveries"] == 2


def test_a_failed_enqueue_leaves_its_connection_usable(one_conn_engine: sa.Engine) -> None:
    """A statement that fails on the pooled connection spoils nothing for the next enqueue."""
    outbox = Outbox(one_conn_engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    outbox.enqueue(make_mail())
    pid = _backend_pid(one_conn_engine)
    elsewhere = Outbox(one_conn_engine, schema="not_migrated", default_sender=DEFAULT_SENDER)
    with pytest.raises(SchemaNotMigrated):
        elsewhere.enqueue(make_mail())

    assert outbox.enqueue(make_mail()).created
    assert _backend_pid(one_conn_engine) == pid  # the same connection, not a new one
    assert outbox.count_by_status()[Status.PENDING] == 2


def test_errors_name_no_mail_content(empty_db_url: sa.URL) -> None:
    """Statement parameters (bodies, addresses) stay out of exception text and logs."""
    engine = sa.create_engine(empty_db_url)
    try:
        outbox = Outbox(engine, default_sender=DEFAULT_SENDER)
        with pytest.raises(SchemaNotMigrated) as failed:
            outbox.enqueue(make_mail(to=["private.person@example.com"], text="secret body"))
        cause = failed.value.__cause__
        assert isinstance(cause, sa.exc.ProgrammingError)
        assert "private.person" not in str(cause)
        assert "secret body" not in str(cause)
    finally:
        engine.dispose()


def test_the_pool_gets_back_a_transactional_connection(one_conn_engine: sa.Engine) -> None:
    """After an autocommit enqueue, a host's rollback on the same connection still undoes."""
    outbox = Outbox(one_conn_engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    outbox.enqueue(make_mail())
    with one_conn_engine.connect() as conn:
        outbox.enqueue(make_mail(), connection=conn)
        conn.rollback()
    assert outbox.count_by_status()[Status.PENDING] == 1


def test_a_failed_record_is_rolled_back_whole(one_conn_engine: sa.Engine) -> None:
    """A transaction of several plans commits all of them or none."""
    outbox = Outbox(one_conn_engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    outbox.enqueue(make_mail())
    store = outbox.store
    with pytest.raises(sa.exc.ProgrammingError), direct(one_conn_engine) as conn:
        store.insert_enqueue(conn, [outbox.prepare(make_mail())])
        # The same plan against a schema that does not exist fails inside the transaction.
        type(store)(tables_for("not_migrated")).insert_enqueue(conn, [outbox.prepare(make_mail())])
    assert outbox.count_by_status()[Status.PENDING] == 1


def test_a_worker_tick_on_a_lost_connection_fails_alone(
    one_conn_engine: sa.Engine, engine: sa.Engine
) -> None:
    """A claim on a dead connection fails that tick only; the next tick delivers."""
    outbox = Outbox(one_conn_engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    transport = NullTransport()
    worker = Worker(outbox, transport, concurrency=1)
    try:
        outbox.enqueue(make_mail())
        assert worker.tick().sent == 1
        Outbox(engine, schema=SCHEMA, default_sender=DEFAULT_SENDER).enqueue(make_mail())
        _terminate(engine, _backend_pid(one_conn_engine))

        with pytest.raises(sa.exc.OperationalError):
            worker.tick()
        assert worker.tick().sent == 1
        assert transport.count == 2
    finally:
        worker.close()
