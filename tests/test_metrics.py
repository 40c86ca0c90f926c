"""Prometheus metrics: the observer's counters, the queue collector and the HTTP endpoint."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from mailoutbox import Outbox, PermanentSendError, Status
from mailoutbox.metrics import OutboxCollector, PrometheusObserver, start_metrics_server
from mailoutbox.records import AttemptRecord, Completion
from mailoutbox.schema import Outcome
from mailoutbox.transports.base import Envelope
from mailoutbox.transports.memory import MemoryTransport
from mailoutbox.worker import TickReport, Worker

from .conftest import SCHEMA
from .factories import make_mail
from .test_store_claim import expire_leases

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def outbox(engine: sa.Engine) -> Outbox:
    """The synchronous Outbox: these tests only set data up through it."""
    return Outbox(engine, schema=SCHEMA, default_sender="Shop <noreply@example.com>")


def completion(outcome: Outcome | None, duration: float = 0.01) -> Completion:
    status = {
        Outcome.SENT: Status.SENT,
        Outcome.TRANSIENT_FAILURE: Status.RETRYING,
        None: Status.DEAD_LETTERED,
    }.get(outcome, Status.DEAD_LETTERED)
    attempt = None if outcome is None else AttemptRecord(outcome, duration_seconds=duration)
    return Completion(uuid.uuid4(), uuid.uuid4(), status, attempt)


def value(observer: PrometheusObserver, name: str, **labels: str) -> float | None:
    return observer.registry.get_sample_value(name, labels)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class FakeOutbox:
    """Stands in for Outbox in collector tests: canned answers, counted calls."""

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.reads = 0
        self.active_reads = 0

    def count_by_status(self) -> dict[Status, int]:
        self.reads += 1
        if self.fail:
            raise ConnectionError("database down")
        return {s: (3 if s is Status.PENDING else 0) for s in Status}

    def count_active(self) -> dict[Status, int]:
        self.active_reads += 1
        return {Status.PENDING: 5, Status.RETRYING: 1, Status.SENDING: 2}

    def queue_health(self) -> tuple[float, int]:
        return 12.5, 2


def test_attempts_are_counted_by_outcome() -> None:
    """Each completion's attempt increments mailoutbox_attempts_total{outcome}."""
    observer = PrometheusObserver()
    observer.on_batch(
        TickReport(claimed=3, sent=2, retried=1),
        [completion(Outcome.SENT), completion(Outcome.SENT), completion(Outcome.TRANSIENT_FAILURE)],
    )
    assert value(observer, "mailoutbox_attempts_total", outcome="sent") == 2
    assert value(observer, "mailoutbox_attempts_total", outcome="transient_failure") == 1
    assert value(observer, "mailoutbox_attempts_total", outcome="permanent_failure") == 0


def test_refused_recipients_are_counted_by_whether_they_are_tried_again() -> None:
    """A partial refusal and a refusal of every recipient both count, per recipient."""
    observer = PrometheusObserver()
    partial = AttemptRecord(
        Outcome.SENT, refused={"grey@example.com": [451, "later"], "gone@example.com": [550, "no"]}
    )
    everyone = AttemptRecord(Outcome.PERMANENT_FAILURE, refused={"x@example.com": [None, "?"]})
    observer.on_batch(
        TickReport(claimed=2, retried=1, dead_lettered=1),
        [
            Completion(uuid.uuid4(), uuid.uuid4(), Status.RETRYING, partial),
            Completion(uuid.uuid4(), uuid.uuid4(), Status.DEAD_LETTERED, everyone),
        ],
    )
    assert value(observer, "mailoutbox_refused_recipients_total", refusal="for_now") == 1
    assert value(observer, "mailoutbox_refused_recipients_total", refusal="for_good") == 2


def test_every_outcome_series_exists_before_any_event() -> None:
    """All outcome and result series start at 0, so rate() and alerts see them at once."""
    observer = PrometheusObserver()
    for outcome in Outcome:
        assert value(observer, "mailoutbox_attempts_total", outcome=outcome.value) == 0
    assert value(observer, "mailoutbox_batch_deliveries_total", result="lost") == 0
    assert value(observer, "mailoutbox_leases_lost_total") == 0
    for refusal in ("for_now", "for_good"):
        assert value(observer, "mailoutbox_refused_recipients_total", refusal=refusal) == 0


def test_send_durations_fill_the_histogram() -> None:
    """Attempt durations are observed; a delivery dead-lettered without an attempt is not."""
    observer = PrometheusObserver()
    observer.on_batch(
        TickReport(claimed=3, sent=2, dead_lettered=1),
        [completion(Outcome.SENT, 0.02), completion(Outcome.SENT, 0.3), completion(None)],
    )
    assert value(observer, "mailoutbox_send_duration_seconds_count") == 2
    assert value(observer, "mailoutbox_send_duration_seconds_sum") == pytest.approx(0.32)
    assert value(observer, "mailoutbox_send_duration_seconds_bucket", le="0.025") == 1


def test_lost_leases_and_batch_results_are_counted() -> None:
    """report.lost feeds mailoutbox_leases_lost_total; every report field its result."""
    observer = PrometheusObserver()
    observer.on_batch(TickReport(claimed=4, sent=1, released=1, lost=2), [])
    observer.on_batch(TickReport(claimed=1, dead_lettered=1), [])
    assert value(observer, "mailoutbox_leases_lost_total") == 2
    assert value(observer, "mailoutbox_batch_deliveries_total", result="lost") == 2
    assert value(observer, "mailoutbox_batch_deliveries_total", result="released") == 1
    assert value(observer, "mailoutbox_batch_deliveries_total", result="dead_lettered") == 1
    assert value(observer, "mailoutbox_batches_total") == 2
    assert (value(observer, "mailoutbox_last_batch_timestamp_seconds") or 0) > time.time() - 60


def test_observers_have_registries_of_their_own() -> None:
    """Two observers in one process neither collide nor share counts."""
    first, second = PrometheusObserver(), PrometheusObserver()
    first.on_batch(TickReport(claimed=1, sent=1), [completion(Outcome.SENT)])
    assert value(first, "mailoutbox_attempts_total", outcome="sent") == 1
    assert value(second, "mailoutbox_attempts_total", outcome="sent") == 0


def test_collector_reports_deliveries_per_state_age_and_leases() -> None:
    """The queue gauges come from count_by_status and queue_health."""
    observer = PrometheusObserver()
    observer.watch(FakeOutbox())  # type: ignore[arg-type]
    assert value(observer, "mailoutbox_deliveries", status="pending") == 3
    assert value(observer, "mailoutbox_deliveries", status="cancelled") == 0
    assert value(observer, "mailoutbox_oldest_due_age_seconds") == 12.5
    assert value(observer, "mailoutbox_leases_in_flight") == 2


def test_collector_reuses_a_recent_read() -> None:
    """Scrapes within min_interval share one database read."""
    outbox = FakeOutbox()
    collector = OutboxCollector(outbox, min_interval=60)  # type: ignore[arg-type]
    list(collector.collect())
    list(collector.collect())
    assert outbox.reads == 1


def test_collector_counts_the_whole_table_only_once_a_minute() -> None:
    """Each read counts the three states a worker acts on (from the partial indexes); the
    whole-table count, sent history included, runs at most every finished_interval."""
    outbox = FakeOutbox()
    collector = OutboxCollector(outbox, min_interval=0, finished_interval=60)  # type: ignore[arg-type]
    samples = [
        {
            s.labels["status"]: s.value
            for f in collector.collect()
            for s in f.samples
            if s.name == "mailoutbox_deliveries"
        }
        for _ in range(3)
    ]
    assert (outbox.reads, outbox.active_reads) == (1, 2)
    assert samples[0]["pending"] == 3 and samples[2]["pending"] == 5
    assert samples[2]["sending"] == 2 and samples[2]["sent"] == 0
    collector.finished_interval = 0
    list(collector.collect())
    assert outbox.reads == 2


def test_collector_registration_does_not_query() -> None:
    """Registering the collector reads nothing: a worker starts even if the scrape would fail."""
    outbox = FakeOutbox()
    PrometheusObserver().watch(outbox)  # type: ignore[arg-type]
    assert outbox.reads == 0


def test_collector_failure_drops_the_gauges_and_counts_the_error() -> None:
    """A failed read leaves the queue gauges out (not stale) and bumps the error counter."""
    observer = PrometheusObserver()
    observer.watch(FakeOutbox(fail=True))  # type: ignore[arg-type]
    samples = {s.name: s.value for f in observer.registry.collect() for s in f.samples}
    assert "mailoutbox_deliveries" not in samples
    assert "mailoutbox_oldest_due_age_seconds" not in samples
    assert samples["mailoutbox_queue_scrape_errors_total"] == 1


def test_a_failed_read_of_the_database_is_logged_on_one_line(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A SQLAlchemy error's text carries its statement over several lines; the warning
    gives the driver's first line, as the worker loop does."""
    elsewhere = sa.create_engine(engine.url.set(database="mailoutbox_no_such_database"))
    observer = PrometheusObserver()
    observer.watch(Outbox(elsewhere, schema=SCHEMA))
    try:
        with caplog.at_level("WARNING", logger="mailoutbox.metrics"):
            list(observer.registry.collect())
    finally:
        elsewhere.dispose()
    [record] = [r for r in caplog.records if r.name == "mailoutbox.metrics"]
    message = record.getMessage()
    assert "\n" not in message and "sqlalche.me" not in message
    assert message.startswith("cannot read the queue state for metrics: OperationalError: ")
    assert "mailoutbox_no_such_database" in message


def test_endpoint_exposes_worker_and_queue_metrics_after_a_tick(outbox: Outbox) -> None:
    """Scraping start_metrics_server after a tick shows the attempts and the queue state."""
    outbox.enqueue_many([make_mail(), make_mail()])
    refused = outbox.enqueue(make_mail(to=["gone@example.com"]))

    def handler(envelope: Envelope) -> None:
        if envelope.delivery_id == refused.delivery_id:
            raise PermanentSendError(550, "5.1.1 no such user")

    observer = PrometheusObserver()
    worker = Worker(outbox, MemoryTransport(handler), observer=observer, name="metrics-test")
    with start_metrics_server(0, outbox, observer, addr="127.0.0.1", min_interval=0) as server:
        worker.tick()
        worker.close()
        samples = scrape(server.port)
    assert samples[("mailoutbox_deliveries", (("status", "sent"),))] == 2
    assert samples[("mailoutbox_deliveries", (("status", "dead_lettered"),))] == 1
    assert samples[("mailoutbox_deliveries", (("status", "pending"),))] == 0
    assert samples[("mailoutbox_attempts_total", (("outcome", "sent"),))] == 2
    assert samples[("mailoutbox_attempts_total", (("outcome", "permanent_failure"),))] == 1
    assert samples[("mailoutbox_send_duration_seconds_count", ())] == 3
    assert samples[("mailoutbox_leases_lost_total", ())] == 0
    assert samples[("mailoutbox_oldest_due_age_seconds", ())] == 0
    assert samples[("mailoutbox_leases_in_flight", ())] == 0


def test_a_lease_taken_over_from_a_dead_worker_counts_a_lease_expired_attempt(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """The README lists lease_expired among the counted outcomes: an alert on it is how
    crashing or hung workers show. The claim records those attempts, so the worker that
    takes the lease over counts them."""
    outbox.enqueue_many([make_mail(), make_mail()])
    with engine.begin() as conn:
        outbox.store.claim_due(conn, limit=10, worker="dead-worker", lease_seconds=60)
    expire_leases(engine)
    observer = PrometheusObserver()
    worker = Worker(outbox, MemoryTransport(), observer=observer, name="heir")
    report = worker.tick()
    worker.close()
    assert report.taken_over == 2 and report.sent == 2
    assert value(observer, "mailoutbox_attempts_total", outcome="lease_expired") == 2
    assert value(observer, "mailoutbox_attempts_total", outcome="sent") == 2
    with engine.connect() as conn:
        recorded = conn.execute(
            sa.text("SELECT count(*) FROM mailoutbox.mail_attempts WHERE outcome = 'lease_expired'")
        ).scalar_one()
    assert recorded == 2


def test_endpoint_reports_the_age_of_the_oldest_due_delivery(outbox: Outbox) -> None:
    """Mail nobody delivers makes mailoutbox_oldest_due_age_seconds grow."""
    outbox.enqueue(make_mail())
    time.sleep(0.2)
    observer = PrometheusObserver()
    with start_metrics_server(0, outbox, observer, addr="127.0.0.1", min_interval=0) as server:
        samples = scrape(server.port)
    assert samples[("mailoutbox_oldest_due_age_seconds", ())] >= 0.2
    assert samples[("mailoutbox_deliveries", (("status", "pending"),))] == 1


def test_importing_mailoutbox_does_not_need_prometheus_client() -> None:
    """prometheus-client is an optional extra: the package and the CLI import without it."""
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import mailoutbox, mailoutbox.cli, mailoutbox.worker\n"
        "try:\n"
        "    import mailoutbox.metrics\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert 'pip install "mailoutbox[metrics]"' in result.stdout
