"""Hygiene: no transaction held across a send, bounded memory, bounded error text, no secrets.

- Worker processes whose every send takes a second never show a backend
  `idle in transaction` (or any transaction) for longer than a blink
  (tests/test_worker.py checks the same in-process; this is real processes).
- One worker process drains tens of thousands of deliveries into a null
  transport: its RSS levels off (peak reported).
- Error texts in attempts, last_error and dead-letter reasons stay bounded
  whatever size the transport or the server throws at them.
- SMTP credentials appear in no row, no log record and no repr, even when the
  server echoes them back.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import timedelta

import psutil
import pytest
import sqlalchemy as sa

from mailoutbox import Outbox, PermanentSendError, Status, TransientSendError
from mailoutbox.retry import RetryPolicy
from mailoutbox.transports.base import Envelope
from mailoutbox.transports.memory import MemoryTransport
from mailoutbox.transports.smtp import SmtpTransport
from mailoutbox.worker import Worker

from ..smtp_sink import SmtpSink
from .harness import (
    APPLICATION_NAME,
    Workers,
    counts,
    enqueue,
    figures,
    mail,
    rows,
    scalar,
    sent,
    wait_for,
)

MEMORY_DELIVERIES = int(os.environ.get("FAULT_MEMORY_DELIVERIES", "50000"))


@pytest.mark.slow
def test_no_transaction_is_held_across_a_send(
    engine: sa.Engine, db_url: sa.URL, outbox: Outbox, sink: SmtpSink
) -> None:
    enqueue(outbox, 24)
    longest = 0.0
    samples = 0
    with Workers(db_url, sink) as workers:
        for n in range(2):
            workers.start(
                f"w{n}", "--batch", "4", "--concurrency", "4", "--delay", "1.0", "--lease", "60"
            )
        wait_for(lambda: sink.open_connections > 0, 30, "the first sends")
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            # The longest-running transaction of any worker backend right now.
            age = scalar(
                engine,
                "SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0)::float"
                " FROM pg_stat_activity WHERE application_name LIKE :app"
                " AND datname = current_database()",
                app=f"{APPLICATION_NAME}/%",
            )
            longest = max(longest, age)
            samples += 1
            time.sleep(0.05)
        workers.stop_all()
    figures(
        "transactions during sends",
        send_seconds=1.0,
        samples=samples,
        longest_worker_transaction_seconds=longest,
    )
    assert samples > 20
    assert longest < 0.5


@pytest.mark.slow
def test_worker_memory_levels_off(engine: sa.Engine, db_url: sa.URL, tmp_path: object) -> None:
    n = MEMORY_DELIVERIES
    with engine.begin() as conn:
        # Generated in SQL: the API would spend longer enqueueing than the worker sending.
        conn.execute(
            sa.text(
                "WITH p AS (INSERT INTO mailoutbox.mail_payloads"
                " (payload_id, content_type, subject, body, sender)"
                " SELECT gen_random_uuid(), 'text/plain', 'Memory ' || g,"
                " convert_to(repeat('Hello ' || g || ' ', 20), 'UTF8'), 'noreply@example.com'"
                " FROM generate_series(1, :n) g RETURNING payload_id, subject)"
                " INSERT INTO mailoutbox.mail_deliveries"
                " (delivery_id, template_id, idempotency_key, status, next_attempt_at, payload_id)"
                " SELECT gen_random_uuid(), 'memory', subject, 'pending', now(), payload_id FROM p"
            ),
            {"n": n},
        )
        conn.execute(
            sa.text(
                "INSERT INTO mailoutbox.mail_recipients"
                " (recipient_id, delivery_id, address, kind, position)"
                " SELECT gen_random_uuid(), delivery_id, 'user@example.com', 'to', 0"
                " FROM mailoutbox.mail_deliveries"
            )
        )
    stats = os.path.join(str(tmp_path), "stats.jsonl")
    samples: list[tuple[int, float]] = []  # (sent, rss MiB)
    with Workers(db_url) as workers:
        start = time.monotonic()
        proc = workers.start(
            "memory", "--batch", "100", "--concurrency", "4", "--lease", "60", "--stats", stats
        )
        watched = psutil.Process(proc.pid)
        while (done := sent(engine)) < n:
            assert proc.poll() is None, "the worker died"
            samples.append((done, watched.memory_info().rss / 2**20))
            assert time.monotonic() - start < 240, "the worker is too slow"
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        assert workers.stop_all() == {"memory": 0}
    with open(stats) as f:
        peak = json.loads(f.readline())["vm_hwm_kib"] / 1024
    # Warm-up: the first tenth of the run (imports, pools, caches filling).
    warm = [rss for done, rss in samples if done >= n // 10]
    baseline = warm[0]
    last = warm[-1]
    figures(
        "worker memory",
        deliveries=n,
        seconds=elapsed,
        per_second=n / elapsed,
        rss_first_sample_mib=samples[0][1],
        rss_max_sampled_mib=max(rss for _, rss in samples),
        rss_after_warmup_mib=baseline,
        rss_at_end_mib=last,
        growth_mib=last - baseline,
        peak_rss_mib=peak,
    )
    assert counts(engine)[Status.SENT] == n
    assert last - baseline < 20


def test_error_texts_stay_bounded(engine: sa.Engine, outbox: Outbox, sink: SmtpSink) -> None:
    huge = "x" * 1_000_000

    def handler(envelope: Envelope) -> None:
        if "transient" in envelope.recipients[0]:
            raise TransientSendError(451, "4.3.0 " + huge)
        if "permanent" in envelope.recipients[0]:
            raise PermanentSendError(554, "5.0.0 " + huge)
        raise RuntimeError(huge)

    kinds = ["transient", "permanent", "crash"]
    for kind in kinds:
        outbox.enqueue(mail(0, idempotency_key=kind, to=[f"{kind}@example.com"]))
    policy = RetryPolicy(max_attempts=2, base_delay=timedelta(0), max_delay=timedelta(0))
    worker = Worker(outbox, MemoryTransport(handler), retry=policy, name="bounded")
    worker.tick()
    worker.tick()
    worker.close()
    # And a real server whose reply is 5,000 characters long.
    sink.mail_reply = "451 4.3.0 " + "z" * 5000
    outbox.enqueue(mail(0, idempotency_key="smtp"))
    smtp = Worker(
        outbox, SmtpTransport(sink.host, sink.port, security="none"), retry=policy, name="bounded"
    )
    smtp.tick()
    smtp.tick()
    smtp.close()
    [(attempts, longest_error, longest_last_error, longest_reason)] = rows(
        engine,
        "SELECT (SELECT count(*) FROM mailoutbox.mail_attempts),"
        " (SELECT max(length(error)) FROM mailoutbox.mail_attempts),"
        " (SELECT max(length(last_error)) FROM mailoutbox.mail_deliveries),"
        " (SELECT max(length(reason)) FROM mailoutbox.mail_dead_letters)",
    )
    figures(
        "error text bounds",
        attempts=attempts,
        longest_attempt_error=longest_error,
        longest_last_error=longest_last_error,
        longest_dead_letter_reason=longest_reason,
        dead_lettered=counts(engine)[Status.DEAD_LETTERED],
    )
    assert counts(engine)[Status.DEAD_LETTERED] == 4
    assert max(longest_error, longest_last_error, longest_reason) <= 2000


PASSWORD = "s3cret-Pa55word!"
WRONG = "wr0ng-Pa55word?"


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("mail.log"):
            return  # aiosmtpd: the test's SMTP server, which of course sees the password
        text = self.format(record)
        self.texts.append(text + " " + json.dumps(vars(record), default=str))


@pytest.fixture
def captured() -> Iterator[Capture]:
    handler = Capture()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def secret_forms(user: str, password: str) -> list[str]:
    return [
        password,
        base64.b64encode(password.encode()).decode(),
        base64.b64encode(f"\0{user}\0{password}".encode()).decode(),
    ]


def test_smtp_credentials_are_never_written(
    engine: sa.Engine, outbox: Outbox, captured: Capture
) -> None:
    user = "mailer"
    with SmtpSink(credentials=(user, PASSWORD), auth_required=True) as sink:
        policy = RetryPolicy(max_attempts=2, base_delay=timedelta(0), max_delay=timedelta(0))
        good = SmtpTransport(
            sink.host, sink.port, security="none", username=user, password=PASSWORD
        )
        bad = SmtpTransport(sink.host, sink.port, security="none", username=user, password=WRONG)
        # 1. a normal send with the right password;
        outbox.enqueue(mail(0, idempotency_key="ok"))
        worker = Worker(outbox, good, retry=policy, name="creds")
        assert worker.tick().sent == 1
        # 2. a server that quotes the password (plain and as AUTH PLAIN sent it) back;
        sink.mail_reply = "451 4.7.0 refused: " + " ".join(secret_forms(user, PASSWORD))
        outbox.enqueue(mail(0, idempotency_key="echo"))
        worker.tick()
        worker.tick()
        worker.close()
        sink.mail_reply = None
        # 3. the wrong password (535, dead-lettered at once).
        outbox.enqueue(mail(0, idempotency_key="wrong"))
        worker = Worker(outbox, bad, retry=policy, name="creds")
        worker.tick()
        worker.close()
        reprs = [repr(good), repr(bad), repr(vars(good)), repr(vars(bad)), repr(worker)]
    dump = "\n".join(
        text
        for table in (
            "mail_deliveries",
            "mail_payloads",
            "mail_recipients",
            "mail_attempts",
            "mail_dead_letters",
        )
        for (text,) in rows(engine, f"SELECT row_to_json(t)::text FROM mailoutbox.{table} t")
    )
    statuses = counts(engine)
    figures(
        "credentials",
        sent=statuses[Status.SENT],
        dead_lettered=statuses[Status.DEAD_LETTERED],
        log_records=len(captured.texts),
        rows_bytes=len(dump),
    )
    assert statuses[Status.SENT] == 1 and statuses[Status.DEAD_LETTERED] == 2
    assert "535" in dump  # the failed login was recorded...
    leaks = [
        (where, form)
        for where, texts in (("database", [dump]), ("logs", captured.texts), ("reprs", reprs))
        for form in secret_forms(user, PASSWORD) + secret_forms(user, WRONG)
        if any(form in text for text in texts)
    ]
    assert not leaks  # ...and no form of either password is anywhere
