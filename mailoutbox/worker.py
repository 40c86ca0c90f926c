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
time still ends dead-lettered after `max_attempts`. A row whose lease expired is
claimed alone, so that such a delivery does not take the rest of its batch
down with it: each of them is charged one `lease_expired` attempt, not one per
death.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType
from typing import Any

import sqlalchemy as sa

from .delivery import (
    EXPIRED_REASON,
    MAX_ERROR_TEXT,
    SentBatch,
    TickReport,
    WorkerObserver,
    WorkerSettings,
    awaitable_returned,
    bounded,
    check_worker_settings,
    completion_retry_delays,
    default_worker_name,
    log_completion_retry,
    may_start_a_send,
)
from .direct import DirectConnection, direct, driver_in_transaction, retire_pool_after_loss
from .outbox import Outbox, translate_missing_schema
from .records import ClaimedDelivery, Completion
from .transports.base import Transport, close_transport

log = logging.getLogger(__name__)


class Worker(WorkerSettings):
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

    def __init__(self, outbox: Outbox, transport: Transport, **settings: Any) -> None:
        if inspect.iscoroutinefunction(getattr(transport, "send", None)):
            # Never awaited on a send thread: every mail would fail unsent.
            raise TypeError(
                "the transport's send is a coroutine function: use mailoutbox.aio.AsyncWorker"
            )
        super().__init__(transport, **settings)
        self.outbox = outbox
        self.store = outbox.store
        self.engine = outbox.engine
        self._stopping = threading.Event()
        # A stop() that no run() has met yet: kept for the run() about to begin (see stop).
        self._stop_asked = False
        self._pool: ThreadPoolExecutor | None = None
        self._claim_thread: ThreadPoolExecutor | None = None

    # --- one pass -----------------------------------------------------------------------

    def tick(self) -> TickReport:
        """Deliver everything due now, batch after batch, and return what happened.

        Safe to call from a host's scheduler every few seconds, from several
        processes at once: claims never overlap. A delivery is claimed at most
        once per tick, even when its retry is due at once. A tick that has put
        1,000 deliveries back for retry (a relay deferring everything) ends after
        that batch, with more perhaps due: run() ticks again at once.

        A batch is claimed, sent, then recorded; the next batch is claimed on a
        connection of its own while that record is written, and sends only once
        it is committed. So a crash repeats the sends of one batch at most, and
        a batch is never claimed (and charged an attempt) while another sends: a
        poison mail that kills its worker mid-send charges its own batch alone,
        and once, because a row whose lease expired is claimed alone.
        """
        report = TickReport()
        exclude: list[uuid.UUID] = []  # retried this tick: not to be claimed again
        if not self._may_claim():
            return report
        claimed, lease_ends = self._claim(exclude)
        while claimed:
            sent = SentBatch(claimed, self._start_sends(claimed, lease_ends)(), lease_ends)
            if not self._stopping.is_set():
                sent.warn_if_the_lease_ran_short(self.lease.total_seconds(), self.name)
            # Only rows put back can come due again in this tick; sent and
            # dead-lettered ones are out of reach of the claim anyway.
            exclude.extend(sent.put_back_ids())
            next_claim: Future[tuple[list[ClaimedDelivery], float]] | None = None
            if self.claims_again_in_tick(claimed, len(exclude)) and self._may_claim():
                # The record below may commit while this claim runs: keep the whole
                # batch out of it, whatever comes back due (retried, handed back).
                ahead = exclude + [c.delivery_id for c in claimed]
                next_claim = self._claimer().submit(self._claim, ahead)
            try:
                report += self._record_alone(sent)
            except BaseException:
                if next_claim is not None:
                    self._hand_back(next_claim)
                raise
            claimed, lease_ends = next_claim.result() if next_claim is not None else ([], 0.0)
        return report

    def _hand_back(self, claim: Future[tuple[list[ClaimedDelivery], float]]) -> None:
        """Release a batch claimed beside a record that failed; nothing of it was sent.

        One try: if the database is away, its leases may as well run out.
        """
        with contextlib.suppress(Exception):
            claimed, lease_ends = claim.result()
            if claimed:
                with direct(self.engine) as conn:
                    self._record(conn, SentBatch(claimed, [None] * len(claimed), lease_ends))

    def _may_claim(self) -> bool:
        # While paused (mail server unavailable) nothing is claimed: no attempt is wasted.
        return not self._stopping.is_set() and not self.pause.remaining()

    def _claim(self, exclude: Sequence[uuid.UUID]) -> tuple[list[ClaimedDelivery], float]:
        """Lease the next batch; answer it and when its lease ends.

        The claim is one statement, run in autocommit: committed on its own,
        without the round trips of BEGIN and COMMIT.
        """
        lease_ends = time.monotonic() + self.lease.total_seconds()
        with (
            translate_missing_schema(self.outbox.schema),
            direct(self.engine, autocommit=True) as conn,
        ):
            claimed = self.store.claim_due(
                conn,
                limit=self.batch_size,
                worker=self.name,
                lease_seconds=self.lease.total_seconds(),
                exclude=exclude,
            )
        return claimed, lease_ends

    def _record(self, conn: DirectConnection, sent: SentBatch) -> tuple[set[uuid.UUID], int]:
        """Write a batch's completions and hand back its unsent leases; answer both counts."""
        completed = self.store.complete(conn, sent.completions)
        released = sum(self.store.release(conn, ids, token) for token, ids in sent.releases())
        return completed, released

    def _record_alone(self, sent: SentBatch) -> TickReport:
        """Record a batch in its own transaction, retried while its lease holds.

        The sends are done: losing their outcome to a passing database failure
        would send the whole batch again after the lease. Completion is fenced,
        hence safe to repeat.
        """
        for delay in completion_retry_delays(sent.lease_ends):
            try:
                with direct(self.engine, autocommit=sent.records_in_one_statement) as conn:
                    outcome = self._record(conn, sent)
                break
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                if delay is None:
                    raise
                log_completion_retry(exc, delay)
                time.sleep(delay)
        self.loop_backoff.progressed()
        return sent.finish(self.name, self.observer, *outcome)

    def _start_sends(
        self, claimed: Sequence[ClaimedDelivery], lease_ends: float
    ) -> Callable[[], list[Completion | None]]:
        """Start handling a batch on up to `concurrency` threads; answer a wait for the outcomes.

        One task per thread, each taking the next delivery, rather than one per
        delivery: a Future per message cost as much as rendering it.
        """
        outcomes: list[Completion | None] = [None] * len(claimed)
        positions = iter(range(len(claimed)))
        take = threading.Lock()

        def work() -> None:
            while True:
                with take:
                    i = next(positions, None)
                if i is None:
                    return
                outcomes[i] = self._handle(claimed[i], lease_ends)

        pool = self._executor()
        tasks = [pool.submit(work) for _ in range(min(self.concurrency, len(claimed)))]

        def wait() -> list[Completion | None]:
            for task in tasks:
                task.result()
            return outcomes

        return wait

    def _claimer(self) -> ThreadPoolExecutor:
        # One thread: claims run one at a time, beside the record of the batch before.
        if self._claim_thread is None:
            self._claim_thread = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="mailoutbox-claim"
            )
        return self._claim_thread

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="mailoutbox-send"
            )
        return self._pool

    # --- one delivery (runs on a send thread; never raises) -----------------------------

    def _handle(self, claimed: ClaimedDelivery, lease_ends: float) -> Completion | None:
        """The delivery's Completion, or None to hand its lease back unsent.

        Handed back: when the worker is stopping, or paused because the mail
        server was unavailable a moment ago, or when too little of the batch's
        lease is left for a send to finish within it (may_start_a_send).
        """
        if (
            self._stopping.is_set()
            or self.pause.remaining()
            or not may_start_a_send(lease_ends, self.lease.total_seconds())
        ):
            return None
        started = time.monotonic()
        try:
            step = self.rules.before_send(claimed)
            if isinstance(step, Completion):
                return step
            try:
                result = self.transport.send(step)
            except BaseException as exc:  # noqa: BLE001 - classified in outcome_of_send
                # Not only Exception: whatever a transport raises on a send thread (a
                # SystemExit out of a library, a gevent-style Timeout) is this delivery's
                # failure; escaping, it lost the record of the whole batch.
                return self.outcome_of_send(claimed, started, exc=exc)
            if inspect.isawaitable(result):
                return self.outcome_of_send(claimed, started, exc=awaitable_returned(result))
            return self.outcome_of_send(claimed, started, result, envelope=step)
        except Exception as exc:  # one delivery must never stop the others
            log.exception("unexpected error handling delivery %s", claimed.delivery_id)
            return self.rules.after_failure(claimed, started, exc, permanent=True)

    # --- the long-running loop ------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, *, handle_signals: bool = True) -> None:
        """Deliver until `stop` is set (or SIGTERM/SIGINT arrives).

        Wakes on NOTIFY when mail is enqueued (unless `listen=False`) and
        polls every `poll_interval` as a fallback. On stop it claims nothing
        more, finishes the sends in flight, records them, hands back leased
        deliveries it had not started, and returns. Database outages are
        survived: the loop logs, waits (delivery.LoopBackoff) and carries on.
        """
        stop = stop or threading.Event()
        self._stopping.clear()
        if self._stop_asked:
            self._stopping.set()
        with self._signals_set(stop, enabled=handle_signals):
            watcher = threading.Thread(target=self._watch, args=(stop,), daemon=True)
            watcher.start()
            listener: _Listener | None = None
            try:
                while not self._stopping.is_set():
                    try:
                        if self.listen and listener is None:
                            listener = _Listener(self.engine, self.store.tables.notify_channel)
                        report = self.tick()
                        self.loop_backoff.progressed()
                        if report.claimed:
                            continue  # more may be due right away
                        if paused := self.pause.remaining():
                            self._stopping.wait(paused)
                            continue
                        self._wait(listener)
                    except Exception as exc:  # noqa: BLE001 - the loop must outlive any failure (logged)
                        wait = self.loop_backoff.failed(exc)
                        if listener is not None:
                            listener.close()
                            listener = None
                        self._stopping.wait(wait)
            finally:
                if listener is not None:
                    listener.close()
                self.close()
                self._stop_asked = False
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
        """Ask `run()` (or a `tick()`) to stop after the sends in flight.

        Asked while no run() is running, as when a thread running it was only
        just started, the stop is kept for the next run(), which returns at
        once, claiming nothing. A run() that ends forgets every stop asked
        before it ended, so the worker can be run again.
        """
        self._stop_asked = True
        self._stopping.set()

    def close(self) -> None:
        """Release the send and claim threads and the transport's connections."""
        for pool in (self._pool, self._claim_thread):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._claim_thread = None
        close_transport(self.transport)


class _Listener:
    """A dedicated autocommit connection LISTENing on the outbox's channel."""

    def __init__(self, engine: sa.Engine, channel: str) -> None:
        self._pool = engine.pool
        raw = engine.raw_connection()
        driver: Any = raw.driver_connection
        # Detached: this connection leaves the pool for good and is closed, not returned.
        raw.detach()
        try:
            if driver_in_transaction(driver):
                # A host's `checkout` event ran SQL: nothing of it matters to LISTEN, and
                # psycopg refuses to switch to autocommit inside a transaction.
                driver.rollback()
            driver.autocommit = True
            driver.execute(f'LISTEN "{channel}"')
        except BaseException as exc:
            retire_pool_after_loss(self._pool, driver, exc)
            driver.close()
            raise
        self._driver = driver

    def wait(self, timeout: float) -> bool:
        """True if a notification arrived within `timeout` seconds."""
        got = False
        try:
            for _ in self._driver.notifies(timeout=timeout, stop_after=1):
                got = True
        except BaseException as exc:
            retire_pool_after_loss(self._pool, self._driver, exc)
            raise
        return got

    def close(self) -> None:
        # psycopg's own close: the pool's would first roll back, which on a connection
        # the server dropped logs a traceback for nothing.
        self._driver.close()


__all__ = [
    "EXPIRED_REASON",
    "MAX_ERROR_TEXT",
    "TickReport",
    "Worker",
    "WorkerObserver",
    "bounded",
    "check_worker_settings",
    "default_worker_name",
]
