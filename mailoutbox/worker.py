"""The worker: claim due deliveries, send them, complete them. No SQL of its own.

One pass (`tick`) repeats claim -> send -> complete until nothing is due:

1. claim: a short committed transaction leases up to `batch_size` rows
   (status `sending`, lease, claim token) and returns them ready to send;
2. send: up to `concurrency` threads render and hand messages to the transport,
   with no database transaction open;
3. complete: one short transaction records every attempt and outcome of the
   batch, fenced by the claim token.

A worker that dies between 1 and 3 loses nothing: its rows become due again
when the lease expires, and the next claim records a `lease_expired` attempt.
Attempts are counted at claim time, so a delivery that kills its worker every
time still ends dead-lettered after `max_attempts`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any, Protocol

import sqlalchemy as sa

from .errors import PermanentSendError, SendError, TransientSendError, UnknownSendOutcome
from .outbox import Outbox, translate_missing_schema
from .records import AttemptRecord, ClaimedDelivery, Completion
from .render import render
from .retry import RetryPolicy
from .schema import Outcome, Status
from .transports.base import Envelope, SendResult, Transport, close_transport

log = logging.getLogger(__name__)

MAX_ERROR_TEXT = 2000
EXPIRED_REASON = "expired"


@dataclass(frozen=True)
class TickReport:
    """What one `tick()` did.

    `claimed` counts leases taken; each ends as `sent`, `retried`,
    `dead_lettered`, `released` (handed back unsent because the worker was
    stopping) or `lost` (the lease was taken over before completion, so the
    outcome was not recorded).
    """

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    lost: int = 0

    def __add__(self, other: TickReport) -> TickReport:
        return TickReport(
            *(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__)
        )


class WorkerObserver(Protocol):
    """Told about every completed batch (metrics live behind this; see metrics.py).

    Called on the worker's thread after the batch's completion committed;
    `completions` includes those that were fenced off (counted in report.lost).
    It must not raise; an exception is logged and ignored.
    """

    def on_batch(self, report: TickReport, completions: Sequence[Completion]) -> None: ...


def bounded(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """Error text cut to `limit` characters, so rows and logs stay bounded."""
    return text if len(text) <= limit else text[: limit - 15] + "... [truncated]"


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Delivers what an Outbox has enqueued, through a Transport.

    Arguments:
        outbox: the Outbox whose engine and schema to work on.
        transport: sends rendered messages; called from up to `concurrency`
            threads at once.
        retry: when to retry a transient failure and when to give up.
        batch_size: deliveries leased per claim.
        concurrency: sends in flight at once (threads).
        lease: how long a claim holds a delivery. Must comfortably exceed the
            longest send (SMTP timeout included): a lease that runs out
            mid-send lets another worker send the same mail.
        poll_interval: in `run()`, how often to look for due mail when no
            notification arrives (retries come due this way).
        listen: in `run()`, wake on LISTEN/NOTIFY when mail is enqueued. Turn
            off behind a transaction-mode connection pooler, which drops LISTEN.
        name: identifies this worker in leases and attempt rows.
        message_id_domain: the domain of Message-IDs (default: sender's domain).
        observer: told about each completed batch (e.g. PrometheusObserver).
    """

    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        *,
        retry: RetryPolicy | None = None,
        batch_size: int = 100,
        concurrency: int = 8,
        lease: timedelta = timedelta(minutes=5),
        poll_interval: timedelta = timedelta(seconds=5),
        listen: bool = True,
        name: str | None = None,
        message_id_domain: str | None = None,
        observer: WorkerObserver | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if lease <= timedelta(0):
            raise ValueError("lease must be positive")
        if poll_interval <= timedelta(0):
            raise ValueError("poll_interval must be positive")
        self.outbox = outbox
        self.store = outbox.store
        self.engine = outbox.engine
        self.transport = transport
        self.retry = retry or RetryPolicy()
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.lease = lease
        self.poll_interval = poll_interval
        self.listen = listen
        self.name = name or default_worker_name()
        self.message_id_domain = message_id_domain
        self.observer = observer
        self._stopping = threading.Event()
        self._pool: ThreadPoolExecutor | None = None

    # --- one pass -----------------------------------------------------------------------

    def tick(self) -> TickReport:
        """Deliver everything due now, batch after batch, and return what happened.

        Safe to call from a host's scheduler every few seconds, from several
        processes at once: claims never overlap. A delivery is claimed at most
        once per tick, even when its retry is due at once.
        """
        report = TickReport()
        retried_this_tick: list[uuid.UUID] = []
        while not self._stopping.is_set():
            with translate_missing_schema(self.outbox.schema), self.engine.begin() as conn:
                claimed = self.store.claim_due(
                    conn,
                    limit=self.batch_size,
                    worker=self.name,
                    lease_seconds=self.lease.total_seconds(),
                    # Only retried rows can come due again in this tick; sent and
                    # dead-lettered ones are out of reach of the claim anyway.
                    exclude=retried_this_tick,
                )
            if not claimed:
                break
            batch = self._deliver(claimed)
            report += batch.report
            retried_this_tick.extend(batch.retried_ids)
            if len(claimed) < self.batch_size:
                break
        return report

    @dataclass(frozen=True)
    class _Batch:
        report: TickReport
        retried_ids: list[uuid.UUID]

    def _deliver(self, claimed: Sequence[ClaimedDelivery]) -> Worker._Batch:
        # None: the worker is stopping and never started that send; its lease goes back.
        outcomes = list(self._executor().map(self._handle, claimed))
        completions = [o for o in outcomes if o is not None]
        unsent = [c for c, o in zip(claimed, outcomes, strict=True) if o is None]
        with self.engine.begin() as conn:
            completed = self.store.complete(conn, completions)
            released = sum(
                self.store.release(conn, [c.delivery_id for c in group], token)
                for token, group in _by_token(unsent)
            )
        counts = {status: 0 for status in (Status.SENT, Status.RETRYING, Status.DEAD_LETTERED)}
        for c in completions:
            if c.delivery_id in completed:
                counts[c.status] += 1
        lost = len(completions) - len(completed)
        if lost:
            log.warning(
                "%d completions were fenced off: their leases had been taken over",
                lost,
                extra={"worker": self.name},
            )
        report = TickReport(
            claimed=len(claimed),
            sent=counts[Status.SENT],
            retried=counts[Status.RETRYING],
            dead_lettered=counts[Status.DEAD_LETTERED],
            released=released,
            lost=lost,
        )
        log.info(
            "batch done: %d claimed, %d sent, %d retrying, %d dead-lettered",
            report.claimed,
            report.sent,
            report.retried,
            report.dead_lettered,
            extra={"worker": self.name},
        )
        if self.observer is not None:
            try:
                self.observer.on_batch(report, completions)
            except Exception:  # observing must never break delivering
                log.exception("worker observer failed")
        retried = [
            c.delivery_id
            for c in completions
            if c.status is Status.RETRYING and c.delivery_id in completed
        ]
        return Worker._Batch(report, retried)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="mailoutbox-send"
            )
        return self._pool

    # --- one delivery (runs on a send thread; never raises) -----------------------------

    def _handle(self, claimed: ClaimedDelivery) -> Completion | None:
        started = time.monotonic()
        try:
            return self._handle_unguarded(claimed, started)
        except Exception as exc:  # one delivery must never stop the others
            log.exception("unexpected error handling delivery %s", claimed.delivery_id)
            return self._failed(claimed, started, exc, permanent=True)

    def _handle_unguarded(self, claimed: ClaimedDelivery, started: float) -> Completion | None:
        if self._stopping.is_set():
            return None
        if claimed.attempts > self.retry.max_attempts:
            # Only reachable through lost leases: each was counted when claimed.
            return self._complete(
                claimed,
                Status.DEAD_LETTERED,
                None,
                reason=f"attempts exhausted ({self.retry.max_attempts}): "
                "the worker holding it was lost each time",
            )
        if claimed.expires_at is not None and claimed.claimed_at >= claimed.expires_at:
            attempt = AttemptRecord(Outcome.EXPIRED, error="expired before it could be sent")
            return self._complete(claimed, Status.DEAD_LETTERED, attempt, reason=EXPIRED_REASON)
        try:
            envelope = render(
                claimed.delivery_id,
                claimed.payload,
                claimed.recipients,
                # The Date header comes from the database clock, like every other time.
                date=claimed.claimed_at,
                message_id_domain=self.message_id_domain,
            )
        except Exception as exc:  # noqa: BLE001 - a message that cannot render is permanent
            return self._failed(claimed, started, exc, permanent=True, prefix="render failed: ")
        try:
            result = self.transport.send(envelope)
        except UnknownSendOutcome as exc:
            return self._failed(claimed, started, exc, permanent=False, outcome=Outcome.UNKNOWN)
        except TransientSendError as exc:
            return self._failed(claimed, started, exc, permanent=False)
        except PermanentSendError as exc:
            return self._failed(claimed, started, exc, permanent=True)
        except (ConnectionError, TimeoutError) as exc:
            return self._failed(claimed, started, exc, permanent=False)
        except Exception as exc:  # noqa: BLE001 - an unknown transport error is permanent
            return self._failed(claimed, started, exc, permanent=True)
        return self._sent(claimed, started, envelope, result)

    def _sent(
        self,
        claimed: ClaimedDelivery,
        started: float,
        envelope: Envelope,
        result: SendResult | None,
    ) -> Completion | None:
        refused = dict(result.refused) if result is not None and result.refused else None
        attempt = AttemptRecord(
            Outcome.SENT,
            duration_seconds=time.monotonic() - started,
            refused={addr: [code, bounded(text, 500)] for addr, (code, text) in refused.items()}
            if refused
            else None,
        )
        log.debug(
            "sent delivery %s as %s",
            claimed.delivery_id,
            envelope.message_id,
            extra={
                "delivery_id": str(claimed.delivery_id),
                "attempt": claimed.attempts,
                "outcome": "sent",
            },
        )
        return self._complete(claimed, Status.SENT, attempt)

    def _failed(
        self,
        claimed: ClaimedDelivery,
        started: float,
        exc: BaseException,
        *,
        permanent: bool,
        outcome: Outcome | None = None,
        prefix: str = "",
    ) -> Completion | None:
        elapsed = time.monotonic() - started
        code = exc.code if isinstance(exc, SendError) else None
        text = bounded(prefix + (str(exc) or type(exc).__name__))
        if outcome is None:
            outcome = Outcome.PERMANENT_FAILURE if permanent else Outcome.TRANSIENT_FAILURE
        attempt = AttemptRecord(
            outcome,
            duration_seconds=elapsed,
            error=text,
            error_class=type(exc).__name__,
            smtp_code=code,
            smtp_enhanced_code=exc.enhanced_code if isinstance(exc, SendError) else None,
        )
        decision = self.retry.decide(
            attempts=claimed.attempts,
            created_at=claimed.cycle_started_at,
            now=claimed.claimed_at + timedelta(seconds=elapsed),
            permanent=permanent,
        )
        log.info(
            "delivery %s attempt %d failed (%s): %s",
            claimed.delivery_id,
            claimed.attempts,
            outcome.value,
            text,
            extra={
                "delivery_id": str(claimed.delivery_id),
                "attempt": claimed.attempts,
                "outcome": outcome.value,
                "smtp_code": code,
            },
        )
        if decision.should_retry:
            return self._complete(
                claimed,
                Status.RETRYING,
                attempt,
                reason=text,
                retry_delay=decision.delay.total_seconds(),
            )
        return self._complete(
            claimed, Status.DEAD_LETTERED, attempt, reason=bounded(f"{decision.reason}: {text}")
        )

    def _complete(
        self,
        claimed: ClaimedDelivery,
        status: Status,
        attempt: AttemptRecord | None,
        *,
        reason: str = "",
        retry_delay: float = 0.0,
    ) -> Completion | None:
        return Completion(
            delivery_id=claimed.delivery_id,
            claim_token=claimed.claim_token,
            status=status,
            attempt=attempt,
            retry_delay_seconds=retry_delay,
            reason=reason,
            worker=self.name,
        )

    # --- the long-running loop ------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, *, handle_signals: bool = True) -> None:
        """Deliver until `stop` is set (or SIGTERM/SIGINT arrives).

        Wakes on NOTIFY when mail is enqueued (unless `listen=False`) and
        polls every `poll_interval` as a fallback. On stop it claims nothing
        more, finishes the sends in flight, records them, hands back leased
        deliveries it had not started, and returns. Database outages are
        survived: the loop logs, backs off (up to 30 s) and carries on.
        """
        stop = stop or threading.Event()
        self._stopping.clear()
        with self._signals_set(stop, enabled=handle_signals):
            watcher = threading.Thread(target=self._watch, args=(stop,), daemon=True)
            watcher.start()
            backoff = 0.0
            listener: _Listener | None = None
            try:
                while not self._stopping.is_set():
                    try:
                        if self.listen and listener is None:
                            listener = _Listener(self.engine, self.store.tables.notify_channel)
                        report = self.tick()
                        backoff = 0.0
                        if report.claimed:
                            continue  # more may be due right away
                        self._wait(listener)
                    except Exception as exc:  # the loop must outlive any failure
                        backoff = min(30.0, max(0.5, backoff * 2))
                        if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
                            log.warning("database unavailable (%s); retry in %.1fs", exc, backoff)
                        else:
                            log.exception("worker loop failed; retry in %.1fs", backoff)
                        if listener is not None:
                            listener.close()
                            listener = None
                        self._stopping.wait(backoff)
            finally:
                if listener is not None:
                    listener.close()
                self.close()
                self._stopping.set()

    def _watch(self, stop: threading.Event) -> None:
        # Forward the caller's event to the internal one; end with the loop either way.
        while not self._stopping.is_set():
            if stop.wait(0.2):
                self._stopping.set()

    def _wait(self, listener: _Listener | None) -> None:
        deadline = time.monotonic() + self.poll_interval.total_seconds()
        while not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            slice_ = min(remaining, 0.5)
            if listener is None:
                self._stopping.wait(slice_)
            elif listener.wait(slice_):
                return

    @contextlib.contextmanager
    def _signals_set(self, stop: threading.Event, *, enabled: bool) -> Iterator[None]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s: finishing sends in flight", signal.Signals(signum).name)
            stop.set()
            self._stopping.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self) -> None:
        """Ask a running `run()` (or `tick()`) to stop after the sends in flight."""
        self._stopping.set()

    def close(self) -> None:
        """Release the send threads and the transport's connections."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        close_transport(self.transport)


def _by_token(
    claimed: Sequence[ClaimedDelivery],
) -> Iterator[tuple[uuid.UUID, list[ClaimedDelivery]]]:
    groups: dict[uuid.UUID, list[ClaimedDelivery]] = {}
    for c in claimed:
        groups.setdefault(c.claim_token, []).append(c)
    yield from groups.items()


class _Listener:
    """A dedicated autocommit connection LISTENing on the outbox's channel."""

    def __init__(self, engine: sa.Engine, channel: str) -> None:
        self._raw = engine.raw_connection()
        driver: Any = self._raw.driver_connection
        # Detached: this connection leaves the pool for good and is closed, not returned.
        self._raw.detach()
        driver.autocommit = True
        driver.execute(f'LISTEN "{channel}"')
        self._driver = driver

    def wait(self, timeout: float) -> bool:
        """True if a notification arrived within `timeout` seconds."""
        got = False
        for _ in self._driver.notifies(timeout=timeout, stop_after=1):
            got = True
        return got

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()


__all__ = ["TickReport", "Worker", "WorkerObserver", "bounded"]
