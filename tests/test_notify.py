"""Waking workers after the outbox's own enqueues: one NOTIFY for many (notify.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

import mailoutbox
from mailoutbox import MemoryTransport, Outbox, Worker
from mailoutbox import notify as notify_module
from mailoutbox import operations as ops
from mailoutbox.mail import prepare
from mailoutbox.notify import AfterCommitNotifier
from mailoutbox.schema import tables_for
from mailoutbox.store import run

from .conftest import DEFAULT_SENDER, SCHEMA
from .factories import make_mail, running

ROOT = Path(__file__).resolve().parent.parent


def libpq(url: sa.URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def listener(db_url: sa.URL) -> Iterator[psycopg.Connection]:
    with psycopg.connect(libpq(db_url), autocommit=True) as conn:
        conn.execute(f'LISTEN "mailoutbox_{SCHEMA}"')
        yield conn


def notifications(conn: psycopg.Connection, wait: float = 0.5) -> int:
    return len(list(conn.notifies(timeout=wait, stop_after=100)))


# --- the trigger and the statement -------------------------------------------------------


def enqueue_quietly(engine: sa.Engine, schema: str = SCHEMA) -> None:
    """Enqueue one mail with notify_after_commit set, in a committed transaction."""
    mail = prepare(make_mail(), default_sender=DEFAULT_SENDER)
    with engine.begin() as conn:
        run(conn, ops.insert_enqueue_one(tables_for(schema), mail, notify_after_commit=True))


def test_enqueue_marked_notify_after_commit_does_not_notify_at_its_commit(
    engine: sa.Engine, listener: psycopg.Connection
) -> None:
    """The trigger stays quiet for it (someone else notifies), and only for it."""
    enqueue_quietly(engine)
    assert notifications(listener) == 0
    Outbox(engine, schema=SCHEMA, default_sender=DEFAULT_SENDER).enqueue(make_mail())
    assert notifications(listener) == 1


def test_many_marked_notify_after_commit_do_not_notify_at_their_commit(
    sync_outbox: Outbox, engine: sa.Engine, listener: psycopg.Connection
) -> None:
    mails = [prepare(make_mail(), default_sender=DEFAULT_SENDER) for _ in range(3)]
    with engine.begin() as conn:
        run(conn, ops.insert_enqueue(sync_outbox.tables, mails, notify_after_commit=True))
    assert notifications(listener) == 0
    assert sync_outbox.count_by_status()[mailoutbox.Status.PENDING] == 3


def test_before_migration_0002_every_enqueue_still_notifies(empty_db_url: sa.URL) -> None:
    """A database one migration behind the code loses no wake-up; downgrading restores it."""
    engine = sa.create_engine(empty_db_url, poolclass=sa.pool.NullPool)
    try:
        with psycopg.connect(libpq(empty_db_url), autocommit=True) as listen:
            listen.execute('LISTEN "mailoutbox_mailoutbox"')
            mailoutbox.migrate(engine, revision="0001")
            enqueue_quietly(engine)
            assert notifications(listen) == 1
            mailoutbox.migrate(engine)
            enqueue_quietly(engine)
            assert notifications(listen) == 0
            mailoutbox.downgrade(engine, revision="0001")
            enqueue_quietly(engine)
            assert notifications(listen) == 1
    finally:
        engine.dispose()


# --- the Outbox ----------------------------------------------------------------------------


def wait_until_blocked_on_a_lock(engine: sa.Engine) -> None:
    deadline = time.monotonic() + 10
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(query).scalar_one():
                return
        time.sleep(0.02)
    raise AssertionError("the first enqueue never blocked")


def test_enqueue_beside_another_in_flight_wakes_a_listening_worker(
    sync_outbox: Outbox, engine: sa.Engine, listener: psycopg.Connection
) -> None:
    """The second of two concurrent enqueues is announced once, after its commit.

    The first enqueue is held in flight by a host transaction that inserted the
    same key and has not committed; the worker polls once a minute, so only a
    NOTIFY can deliver the second mail in time.
    """
    transport = MemoryTransport()
    worker = Worker(sync_outbox, transport, poll_interval=timedelta(seconds=60))
    host = engine.connect()
    host_transaction = host.begin()
    first_result: list[mailoutbox.Enqueued] = []
    try:
        with running(worker):
            time.sleep(0.5)
            sync_outbox.enqueue(make_mail(idempotency_key="held"), connection=host)
            first = threading.Thread(
                target=lambda: first_result.append(
                    sync_outbox.enqueue(make_mail(idempotency_key="held"))
                )
            )
            first.start()
            wait_until_blocked_on_a_lock(engine)
            notifications(listener, wait=0.1)  # the worker's own start-up, if any

            second = sync_outbox.enqueue(make_mail(idempotency_key="second"))
            deadline = time.monotonic() + 5
            while not transport.sent and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [m.delivery_id for m in transport.sent] == [second.delivery_id]
            assert notifications(listener) == 1  # the notifier's, not one per transaction

            host_transaction.commit()
            first.join(10)
            assert first_result and not first_result[0].created
    finally:
        if host_transaction.is_active:
            host_transaction.rollback()
        host.close()


def test_many_threads_enqueuing_are_all_delivered_without_polling(sync_outbox: Outbox) -> None:
    transport = MemoryTransport()
    worker = Worker(sync_outbox, transport, poll_interval=timedelta(seconds=60))
    ids: list[object] = []
    with running(worker):
        time.sleep(0.5)

        def enqueue_some() -> None:
            for _ in range(10):
                ids.append(sync_outbox.enqueue(make_mail()).delivery_id)

        threads = [threading.Thread(target=enqueue_some) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 10
        while len(transport.sent) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert sorted(str(m.delivery_id) for m in transport.sent) == sorted(str(i) for i in ids)


def test_a_pending_notification_is_sent_before_the_process_exits(
    db_url: sa.URL, listener: psycopg.Connection
) -> None:
    """A script that enqueues beside another enqueue and exits at once still wakes workers."""
    script = textwrap.dedent(
        f"""
        import time
        import sqlalchemy as sa
        from mailoutbox import Mail, Outbox
        outbox = Outbox(sa.create_engine({db_url.render_as_string(hide_password=False)!r}),
                        schema={SCHEMA!r}, default_sender="a@example.com")
        mail = Mail(template_id="t", idempotency_key="exit", to=["b@example.com"], text="x")
        send = outbox._notifier._send
        outbox._notifier._send = lambda: (time.sleep(0.3), send())  # a slow server
        with outbox._notifier.enqueuing():  # as if another thread were enqueuing
            outbox.enqueue(mail)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert notifications(listener, wait=2) == 1


# --- the notifier alone (its thread logic; the NOTIFY is a stand-in) ------------------------


class RecordingSend:
    def __init__(self) -> None:
        self.calls: list[float] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_next = False

    def __call__(self) -> None:
        self.started.set()
        self.gate.wait(10)
        self.calls.append(time.monotonic())
        if self.fail_next:
            self.fail_next = False
            raise sa.exc.OperationalError("SELECT pg_notify", {}, Exception("server gone"))


def test_notifier_defers_only_beside_another_enqueue() -> None:
    notifier = AfterCommitNotifier(RecordingSend())
    with notifier.enqueuing() as first:
        with notifier.enqueuing() as second:
            assert second is True
        assert first is False
    with notifier.enqueuing() as alone:
        assert alone is False


def test_wakes_during_a_send_are_covered_by_one_more_send() -> None:
    send = RecordingSend()
    notifier = AfterCommitNotifier(send)
    send.gate.clear()
    notifier.wake()
    assert send.started.wait(5)
    woken_at = time.monotonic()
    for _ in range(5):
        notifier.wake()
    send.gate.set()
    assert notifier.flush(5)
    assert len(send.calls) == 2
    assert send.calls[1] > woken_at  # the wakes came before the send that covers them


def test_a_failed_notification_is_logged_and_the_next_wake_still_sends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    send = RecordingSend()
    send.fail_next = True
    notifier = AfterCommitNotifier(send)
    with caplog.at_level(logging.WARNING, logger="mailoutbox.notify"):
        notifier.wake()
        assert notifier.flush(5)
    [record] = caplog.records
    assert "next poll" in record.getMessage() and "server gone" in record.getMessage()
    assert not record.exc_info  # a database error is one line, no traceback
    notifier.wake()
    assert notifier.flush(5)
    assert len(send.calls) == 2


def test_an_idle_notifier_thread_ends_and_a_later_wake_starts_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(notify_module, "IDLE_SECONDS", 0.05)
    send = RecordingSend()
    notifier = AfterCommitNotifier(send)

    def notify_threads() -> int:
        return sum(t.name == "mailoutbox-notify" and t.is_alive() for t in threading.enumerate())

    before = notify_threads()
    notifier.wake()
    assert notifier.flush(5)
    deadline = time.monotonic() + 5
    while notify_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert notify_threads() == before
    notifier.wake()
    assert notifier.flush(5)
    assert len(send.calls) == 2
