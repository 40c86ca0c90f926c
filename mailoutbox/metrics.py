"""Prometheus metrics for a worker (the optional `metrics` extra: prometheus-client).

`PrometheusObserver` is a `WorkerObserver`: the worker tells it about every
completed batch, and it counts attempts by outcome, batch results, leases lost
and send durations. `OutboxCollector` reads the queue itself (deliveries per
state, oldest due age, leases in flight) from the database when Prometheus
scrapes, at most once per `min_interval` seconds. `start_metrics_server`
serves both over HTTP.

Every observer has a registry of its own (`observer.registry`), so several
workers or tests in one process never collide. Importing mailoutbox does not
import this module; importing this module without prometheus-client raises
ImportError with the install hint.

Metrics (see README "Metrics"):

============================================  =========  ===========================================
mailoutbox_deliveries{status}                 gauge      deliveries in each state (every state)
mailoutbox_oldest_due_age_seconds             gauge      how long the oldest due delivery has waited
mailoutbox_leases_in_flight                   gauge      deliveries leased by a worker (sending)
mailoutbox_queue_scrape_errors_total          counter    failed reads of the queue state
mailoutbox_attempts_total{outcome}            counter    send attempts by outcome
mailoutbox_refused_recipients_total{refusal}  counter    recipients refused: for_now (4xx), for_good
mailoutbox_batch_deliveries_total{result}     counter    claimed deliveries by batch result
mailoutbox_send_duration_seconds              histogram  time to render and hand one message over
mailoutbox_leases_lost_total                  counter    completions fenced off (lease taken over)
mailoutbox_batches_total                      counter    batches completed
mailoutbox_last_batch_timestamp_seconds       gauge      Unix time of the last completed batch
============================================  =========  ===========================================
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.exposition import start_http_server
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        'mailoutbox metrics need prometheus-client: pip install "mailoutbox[metrics]"'
    ) from exc

from .errors import driver_error, first_line
from .schema import TERMINAL_STATUSES, Outcome, Status

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .outbox import Outbox
    from .records import Completion
    from .worker import TickReport

log = logging.getLogger(__name__)

# Sends to a relay take milliseconds; to a slow remote server, seconds (up to the timeout).
SEND_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# TickReport fields, as values of mailoutbox_batch_deliveries_total{result}.
BATCH_RESULTS = ("sent", "retried", "dead_lettered", "released", "lost")
# Values of mailoutbox_refused_recipients_total{refusal}: a 4xx (retried for that
# recipient), anything else (never retried).
REFUSALS = ("for_now", "for_good")


def _refusal(reply: Sequence[object]) -> str:
    code = reply[0]
    return "for_now" if isinstance(code, int) and 400 <= code < 500 else "for_good"


class PrometheusObserver:
    """Counts what the worker does; pass it as `Worker(..., observer=...)`.

    `registry` defaults to a new CollectorRegistry of its own. Every label
    value is created up front, so each series exists (at 0) from the start
    and rate() and alerts see it before the first event.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.attempts = Counter(
            "mailoutbox_attempts",
            "Send attempts, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.batch_deliveries = Counter(
            "mailoutbox_batch_deliveries",
            "Claimed deliveries, by how their batch ended them "
            "(sent, retried, dead_lettered, released unsent on stop, lost).",
            ["result"],
            registry=self.registry,
        )
        self.refused_recipients = Counter(
            "mailoutbox_refused_recipients",
            "Recipients a server refused in an attempt: for_now (4xx, tried again) or "
            "for_good (anything else, not tried again once another recipient has the mail).",
            ["refusal"],
            registry=self.registry,
        )
        self.send_duration = Histogram(
            "mailoutbox_send_duration_seconds",
            "Time to render one message and hand it to the transport, failures included.",
            buckets=SEND_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.leases_lost = Counter(
            "mailoutbox_leases_lost",
            "Completions that were fenced off because another worker had taken the lease over.",
            registry=self.registry,
        )
        self.batches = Counter(
            "mailoutbox_batches", "Batches the worker completed.", registry=self.registry
        )
        self.last_batch = Gauge(
            "mailoutbox_last_batch_timestamp_seconds",
            "Unix time at which the worker last completed a batch.",
            registry=self.registry,
        )
        for outcome in Outcome:
            self.attempts.labels(outcome=outcome.value)
        for result in BATCH_RESULTS:
            self.batch_deliveries.labels(result=result)
        for refusal in REFUSALS:
            self.refused_recipients.labels(refusal=refusal)
        self._collector: OutboxCollector | None = None
        self._lock = threading.Lock()

    def on_batch(self, report: TickReport, completions: Sequence[Completion]) -> None:
        """Count one completed batch (the WorkerObserver protocol)."""
        for completion in completions:
            attempt = completion.attempt
            if attempt is None:
                continue
            self.attempts.labels(outcome=Outcome(attempt.outcome).value).inc()
            for reply in (attempt.refused or {}).values():
                self.refused_recipients.labels(refusal=_refusal(reply)).inc()
            if attempt.outcome is not Outcome.EXPIRED:
                # An expired delivery was never handed to the transport: no duration.
                self.send_duration.observe(max(0.0, attempt.duration_seconds))
        if report.taken_over:
            # The claim wrote these attempts (no completion carries them).
            self.attempts.labels(outcome=Outcome.LEASE_EXPIRED.value).inc(report.taken_over)
        for result in BATCH_RESULTS:
            value = getattr(report, result)
            if value:
                self.batch_deliveries.labels(result=result).inc(value)
        if report.lost:
            self.leases_lost.inc(report.lost)
        self.batches.inc()
        self.last_batch.set_to_current_time()

    def watch(self, outbox: Outbox, *, min_interval: float = 2.0) -> OutboxCollector:
        """Export the queue state of `outbox` from this observer's registry (once)."""
        with self._lock:
            if self._collector is None:
                self._collector = OutboxCollector(outbox, min_interval=min_interval)
                self.registry.register(self._collector)
            return self._collector


@dataclass(frozen=True)
class _Snapshot:
    counts: dict[Status, int]
    oldest_due_seconds: float
    leased: int


class OutboxCollector(Collector):
    """Reads deliveries per state, oldest due age and leases in flight from the database.

    Read when Prometheus scrapes, and reused for `min_interval` seconds so
    several scrapers do not multiply the queries. A failed read is logged
    and counted (mailoutbox_queue_scrape_errors_total), and the queue gauges
    are left out of that scrape rather than reporting stale values.

    The finished states (sent, dead_lettered, cancelled) are counted over the
    whole table, at most every `finished_interval` seconds; every scrape counts
    the other three from the partial indexes. Counting all six at each scrape
    read the whole history, 160-210 ms at a million sent deliveries, in every
    worker process.
    """

    def __init__(
        self, outbox: Outbox, *, min_interval: float = 2.0, finished_interval: float = 60.0
    ) -> None:
        self.outbox = outbox
        self.min_interval = min_interval
        self.finished_interval = finished_interval
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._taken_at = 0.0
        self._finished: dict[Status, int] | None = None
        self._finished_at = 0.0
        self._errors = 0

    def describe(self) -> Iterable[Metric]:
        # Names only: registration must not query the database.
        yield from self._families(None, describe=True)

    def collect(self) -> Iterable[Metric]:
        yield from self._families(self._read(), describe=False)

    def _read(self) -> _Snapshot | None:
        with self._lock:
            now = time.monotonic()
            if self._snapshot is not None and now - self._taken_at < self.min_interval:
                return self._snapshot
            try:
                counts = self._counts(now)
                oldest, leased = self.outbox.queue_health()
            except Exception as exc:  # noqa: BLE001 - a scrape must answer when the database does not
                self._errors += 1
                self._snapshot = None
                # One line, as the worker loop logs it (LoopBackoff): str() of a
                # SQLAlchemy error carries the whole statement over several lines.
                log.warning(
                    "cannot read the queue state for metrics: %s: %s",
                    type(driver_error(exc) or exc).__name__,
                    first_line(exc),
                )
                return None
            self._snapshot = _Snapshot(counts, oldest, leased)
            self._taken_at = now
            return self._snapshot

    def _counts(self, now: float) -> dict[Status, int]:
        if self._finished is not None and now - self._finished_at < self.finished_interval:
            return {**self._finished, **self.outbox.count_active()}
        counts = self.outbox.count_by_status()
        self._finished = {status: counts[status] for status in TERMINAL_STATUSES}
        self._finished_at = now
        return counts

    def _families(self, snapshot: _Snapshot | None, *, describe: bool) -> Iterable[Metric]:
        deliveries = GaugeMetricFamily(
            "mailoutbox_deliveries", "Deliveries in each state.", labels=["status"]
        )
        oldest = GaugeMetricFamily(
            "mailoutbox_oldest_due_age_seconds",
            "Seconds the oldest due delivery (pending or retrying, due now) has waited; "
            "0 when nothing is due.",
        )
        leased = GaugeMetricFamily(
            "mailoutbox_leases_in_flight", "Deliveries leased by a worker (status sending)."
        )
        if snapshot is not None:
            for status in Status:
                deliveries.add_metric([status.value], snapshot.counts.get(status, 0))
            oldest.add_metric([], snapshot.oldest_due_seconds)
            leased.add_metric([], snapshot.leased)
        if snapshot is not None or describe:
            yield from (deliveries, oldest, leased)
        errors = CounterMetricFamily(
            "mailoutbox_queue_scrape_errors", "Failed reads of the queue state for metrics."
        )
        errors.add_metric([], self._errors)
        yield errors


class MetricsServer:
    """A running metrics HTTP endpoint; `close()` stops it and joins its thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        """The port it listens on (the real one when started on port 0)."""
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_metrics_server(
    port: int,
    outbox: Outbox,
    observer: PrometheusObserver,
    *,
    addr: str = "0.0.0.0",
    min_interval: float = 2.0,
) -> MetricsServer:
    """Serve `observer`'s metrics and `outbox`'s queue state at http://addr:port/metrics.

    Port 0 picks a free port (see MetricsServer.port). Runs in a daemon thread;
    call `close()` on the result to stop it.
    """
    observer.watch(outbox, min_interval=min_interval)
    server, thread = start_http_server(port, addr=addr, registry=observer.registry)
    log.info("metrics served on %s:%d", addr, server.server_port)
    return MetricsServer(server, thread)


__all__ = [
    "BATCH_RESULTS",
    "SEND_DURATION_BUCKETS",
    "MetricsServer",
    "OutboxCollector",
    "PrometheusObserver",
    "start_metrics_server",
]
