"""The async twin: AsyncStore, AsyncOutbox and AsyncWorker for asyncio applications.

They run the very same plans (operations.py) and statements (statements.py)
as the sync classes, on SQLAlchemy's AsyncConnection with psycopg's async
driver, and take the same per-delivery decisions (delivery.py). Enqueue joins
the caller's AsyncConnection or AsyncSession transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import operations as ops
from .delivery import (
    SentBatch,
    TickReport,
    WorkerSettings,
    completion_retry_delays,
    log_completion_retry,
    may_start_a_send,
)
from .direct import driver_in_transaction, retire_pool_after_loss
from .mail import DEFAULT_MAX_PAYLOAD_BYTES, Mail
from .outbox import (
    OutboxSettings,
    as_delivery_id,
    check_page,
    check_purge,
    require_psycopg,
    translate_missing_schema,
)
from .records import (
    Attempt,
    ClaimedDelivery,
    Completion,
    DeadLetter,
    Delivery,
    Enqueued,
    Page,
    Payload,
    Recipient,
)
from .schema import DEFAULT_SCHEMA, Status
from .transports.base import Envelope, SendResult, close_transport

log = logging.getLogger(__name__)
T = TypeVar("T")


@contextlib.asynccontextmanager
async def transaction(
    engine: AsyncEngine, *, autocommit: bool = False
) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction committed on leaving the block (direct.direct's twin).

    `autocommit`: for a plan whose writes are one statement, atomic on its own;
    it then costs one round trip instead of three (BEGIN, statement, COMMIT).
    A connection a host's `checkout` event left in a transaction cannot switch
    to autocommit: the plan then runs in that transaction, committed on leaving.
    """
    async with engine.connect() as conn:
        if autocommit and not await _in_transaction(conn):
            yield await conn.execution_options(isolation_level="AUTOCOMMIT")
        else:
            async with conn.begin():
                yield conn


async def _in_transaction(conn: AsyncConnection) -> bool:
    """Whether the driver connection is in a transaction already (see direct.py)."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    return driver_in_transaction(driver)


async def arun(conn: AsyncConnection, plan: ops.Plan[T]) -> T:
    """Drive a plan to its answer, executing each Query it yields on `conn`."""
    try:
        query = next(plan)
        while True:
            if query.arrays:
                ops.use_binary_results(conn.sync_engine)
                sql, params = ops.driver_call(query, conn.dialect)
                result = await conn.exec_driver_sql(sql, params, ops.BINARY_RESULTS)
            else:
                result = await conn.execute(query.statement, query.params or {})
            query = plan.send(ops.fetch(result, query.fetch))
    except StopIteration as done:
        answer: T = done.value
        return answer


async def async_connection_of(connection: Any) -> AsyncConnection:
    """The AsyncConnection behind an AsyncConnection or an AsyncSession."""
    if isinstance(connection, AsyncConnection):
        return connection
    get = getattr(connection, "connection", None)
    if callable(get):
        conn = get()
        if inspect.isawaitable(conn):
            conn = await conn
        if isinstance(conn, AsyncConnection):
            return conn
    raise TypeError(f"expected an AsyncConnection or AsyncSession, got {type(connection).__name__}")


class AsyncStore:
    """The store's worker operations on an AsyncConnection the caller owns."""

    def __init__(self, settings: OutboxSettings) -> None:
        self.tables = settings.tables

    async def claim_due(
        self,
        conn: AsyncConnection,
        *,
        limit: int,
        worker: str,
        lease_seconds: float,
        exclude: Sequence[uuid.UUID] = (),
        claim_token: uuid.UUID | None = None,
    ) -> list[ClaimedDelivery]:
        return await arun(
            conn,
            ops.claim_due(
                self.tables,
                limit=limit,
                worker=worker,
                lease_seconds=lease_seconds,
                exclude=exclude,
                claim_token=claim_token,
            ),
        )

    async def complete(
        self, conn: AsyncConnection, completions: Sequence[Completion]
    ) -> set[uuid.UUID]:
        return await arun(conn, ops.complete(self.tables, completions))

    async def release(
        self, conn: AsyncConnection, delivery_ids: Sequence[uuid.UUID], claim_token: uuid.UUID
    ) -> int:
        return await arun(conn, ops.release(self.tables, delivery_ids, claim_token))


class AsyncOutbox(OutboxSettings):
    """Every operation of `Outbox`, as coroutines on an AsyncEngine.

    Same guarantees and errors: enqueue on the caller's AsyncConnection (or an
    AsyncSession) commits and rolls back with the caller; duplicates return
    the existing id with created=False and never abort the transaction.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        schema: str = DEFAULT_SCHEMA,
        default_sender: str | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        require_psycopg(engine)
        super().__init__(
            schema=schema, default_sender=default_sender, max_payload_bytes=max_payload_bytes
        )
        self.engine = engine
        self.store = AsyncStore(self)

    async def _read(self, plan: ops.Plan[T]) -> T:
        with translate_missing_schema(self.schema):
            async with self.engine.connect() as conn:
                return await arun(conn, plan)

    async def _write(self, plan: ops.Plan[T]) -> T:
        with translate_missing_schema(self.schema):
            async with self.engine.begin() as conn:
                return await arun(conn, plan)

    async def _autocommit(self, plan: ops.Plan[T]) -> T:
        # See Outbox._autocommit: one statement, one round trip.
        with translate_missing_schema(self.schema):
            async with transaction(self.engine, autocommit=True) as conn:
                return await arun(conn, plan)

    async def enqueue(self, mail: Mail, *, connection: Any = None) -> Enqueued:
        """Enqueue one mail; see enqueue_many."""
        plan = ops.insert_enqueue_one(self.tables, self.prepare(mail))
        return Enqueued(*(await self._enqueue(plan, connection)))

    async def enqueue_many(
        self, mails: Sequence[Mail], *, connection: Any = None
    ) -> list[Enqueued]:
        """Enqueue mails in one statement, in the caller's transaction when given one.

        See Outbox.enqueue_many: the same validation, order and duplicate rules.
        """
        plan = ops.insert_enqueue(self.tables, [self.prepare(mail) for mail in mails])
        results = await self._enqueue(plan, connection)
        return [Enqueued(delivery_id, created) for delivery_id, created in results]

    async def _enqueue(self, plan: ops.Plan[T], connection: Any) -> T:
        if connection is None:
            return await self._autocommit(plan)
        with translate_missing_schema(self.schema):
            return await arun(await async_connection_of(connection), plan)

    async def get_delivery(self, delivery_id: uuid.UUID | str) -> Delivery:
        return await self._read(ops.require_delivery(self.tables, as_delivery_id(delivery_id)))

    async def list_deliveries(
        self,
        offset: int = 0,
        limit: int = 50,
        status: Status | str | None = None,
        *,
        template_id: str | None = None,
    ) -> Page[Delivery]:
        check_page(offset, limit)
        items, total = await self._read(
            ops.list_deliveries(
                self.tables,
                offset=offset,
                limit=limit,
                status=None if status is None else Status(status),
                template_id=template_id,
            )
        )
        return Page(items, total, offset, limit)

    async def list_recipients(self, delivery_id: uuid.UUID | str) -> list[Recipient]:
        return await self._read(ops.recipients_of(self.tables, as_delivery_id(delivery_id)))

    async def get_payload(self, delivery_id: uuid.UUID | str) -> Payload:
        return await self._read(ops.payload_of(self.tables, as_delivery_id(delivery_id)))

    async def list_attempts(self, delivery_id: uuid.UUID | str) -> list[Attempt]:
        return await self._read(ops.attempts_of(self.tables, as_delivery_id(delivery_id)))

    async def list_dead_letters(self, offset: int = 0, limit: int = 50) -> Page[DeadLetter]:
        check_page(offset, limit)
        items, total = await self._read(
            ops.list_dead_letters(self.tables, offset=offset, limit=limit)
        )
        return Page(items, total, offset, limit)

    async def count_by_status(self) -> dict[Status, int]:
        return await self._read(ops.count_by_status(self.tables))

    async def count_active(self) -> dict[Status, int]:
        return await self._read(ops.count_active(self.tables))

    async def queue_health(self) -> tuple[float, int]:
        return await self._read(ops.queue_health(self.tables))

    async def resend(self, delivery_id: uuid.UUID | str) -> Delivery:
        return await self._write(ops.resend(self.tables, as_delivery_id(delivery_id)))

    async def cancel(self, delivery_id: uuid.UUID | str) -> Delivery:
        return await self._write(ops.cancel(self.tables, as_delivery_id(delivery_id)))

    async def purge(
        self, older_than: timedelta = timedelta(days=30), *, batch_size: int = 1000
    ) -> int:
        check_purge(older_than, batch_size)
        total = 0
        while True:
            deleted = await self._write(
                ops.purge_batch(
                    self.tables, older_than_seconds=older_than.total_seconds(), batch=batch_size
                )
            )
            total += deleted
            if deleted < batch_size:
                return total


class _SendThreadExit(Exception):
    """A KeyboardInterrupt or SystemExit that a transport raised on a send thread.

    Not the host stopping the worker (see _stops_the_worker): that send's failure.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


def _stops_the_worker(exc: BaseException) -> bool:
    """Whether an exception out of an awaited send is the host stopping the worker.

    Ctrl-C and SystemExit on the loop's thread are, as everywhere in asyncio
    (a send thread's are its failure: _SendThreadExit); so is a CancelledError
    while this task is being cancelled (a cancelled tick, or run() past its
    lease). Any other exception, a CancelledError leaked by an async library
    included, is the send's failure: raised on, it lost the record of the whole
    batch and ended run() as if cancelled. Before Python 3.11 a task cannot
    tell who cancelled it, and a CancelledError always stops the worker.
    """
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return True
    if isinstance(exc, asyncio.CancelledError):
        cancelling = getattr(asyncio.current_task(), "cancelling", None)
        return cancelling is None or bool(cancelling())
    return False


class AsyncWorker(WorkerSettings):
    """Delivers inside an event loop, with Worker's lease, fencing, retry and stop rules.

    `transport` is any Transport: one whose `send` is a coroutine function is
    awaited; a synchronous one (SmtpTransport) runs in a thread, so a slow
    server never blocks the loop. At most `concurrency` sends are in flight.
    See Worker for the other arguments.
    """

    def __init__(self, outbox: AsyncOutbox, transport: Any, **settings: Any) -> None:
        super().__init__(transport, **settings)
        self.outbox = outbox
        self.store = outbox.store
        self.engine = outbox.engine
        # Set by stop(); run() makes a new one each time, as an Event is bound to the
        # loop of its first wait(): one worker serves asyncio.run() after asyncio.run().
        self._stopping = asyncio.Event()
        # A stop() that no run() has met yet: kept for the run() about to begin (see stop).
        self._stop_asked = False
        self._async_send = inspect.iscoroutinefunction(getattr(transport, "send", None))
        self._pool: ThreadPoolExecutor | None = None

    async def tick(self) -> TickReport:
        """Deliver everything due now, batch after batch (see Worker.tick).

        As in Worker.tick, the next batch is claimed (on a connection of its own)
        while a batch is recorded, never while one sends.
        """
        report = TickReport()
        exclude: list[uuid.UUID] = []  # retried this tick: not to be claimed again
        if not self._may_claim():
            return report
        claimed, lease_ends = await self._claim(exclude)
        while claimed:
            sent = SentBatch(claimed, await self._handle_all(claimed, lease_ends), lease_ends)
            if not self._stopping.is_set():
                sent.warn_if_the_lease_ran_short(self.lease.total_seconds(), self.name)
            exclude.extend(sent.put_back_ids())
            next_claim: asyncio.Future[tuple[list[ClaimedDelivery], float]] | None = None
            if self.claims_again_in_tick(claimed, len(exclude)) and self._may_claim():
                # As in Worker.tick: keep this batch out of the claim beside its record.
                ahead = exclude + [c.delivery_id for c in claimed]
                next_claim = asyncio.ensure_future(self._claim(ahead))
            try:
                report += await self._record_alone(sent)
            except BaseException:
                if next_claim is not None:
                    await self._hand_back(next_claim)
                raise
            claimed, lease_ends = await next_claim if next_claim is not None else ([], 0.0)
        return report

    async def _hand_back(self, claim: asyncio.Future[tuple[list[ClaimedDelivery], float]]) -> None:
        """Release a batch claimed beside a record that failed (see Worker._hand_back)."""
        with contextlib.suppress(Exception):
            claimed, lease_ends = await claim
            if claimed:
                async with transaction(self.engine) as conn:
                    await self._record(conn, SentBatch(claimed, [None] * len(claimed), lease_ends))

    def _may_claim(self) -> bool:
        return not self._stopping.is_set() and not self.pause.remaining()

    async def _claim(self, exclude: Sequence[uuid.UUID]) -> tuple[list[ClaimedDelivery], float]:
        # One statement in autocommit, as in Worker._claim.
        lease_ends = time.monotonic() + self.lease.total_seconds()
        with translate_missing_schema(self.outbox.schema):
            async with transaction(self.engine, autocommit=True) as conn:
                claimed = await self.store.claim_due(
                    conn,
                    limit=self.batch_size,
                    worker=self.name,
                    lease_seconds=self.lease.total_seconds(),
                    exclude=exclude,
                )
        return claimed, lease_ends

    async def _record(self, conn: AsyncConnection, sent: SentBatch) -> tuple[set[uuid.UUID], int]:
        completed = await self.store.complete(conn, sent.completions)
        released = 0
        for token, ids in sent.releases():
            released += await self.store.release(conn, ids, token)
        return completed, released

    async def _record_alone(self, sent: SentBatch) -> TickReport:
        """As Worker._record_alone: retried while the batch's lease holds."""
        for delay in completion_retry_delays(sent.lease_ends):
            try:
                async with transaction(
                    self.engine, autocommit=sent.records_in_one_statement
                ) as conn:
                    outcome = await self._record(conn, sent)
                break
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                if delay is None:
                    raise
                log_completion_retry(exc, delay)
                await asyncio.sleep(delay)
        self.loop_backoff.progressed()
        return sent.finish(self.name, self.observer, *outcome)

    async def _handle_all(
        self, claimed: Sequence[ClaimedDelivery], lease_ends: float
    ) -> list[Completion | None]:
        gate = asyncio.Semaphore(self.concurrency)

        async def handle(c: ClaimedDelivery) -> Completion | None:
            async with gate:
                return await self._handle(c, lease_ends)

        return list(await asyncio.gather(*(handle(c) for c in claimed)))

    async def _handle(self, claimed: ClaimedDelivery, lease_ends: float) -> Completion | None:
        # Handed back as in Worker._handle: stopping, paused, or too little lease left.
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
                result = await self._send(step)
            except _SendThreadExit as exit_:
                return self.outcome_of_send(claimed, started, exc=exit_.original)
            except BaseException as exc:  # classified in outcome_of_send
                if _stops_the_worker(exc):
                    raise
                return self.outcome_of_send(claimed, started, exc=exc)
            return self.outcome_of_send(claimed, started, result, envelope=step)
        except Exception as exc:  # one delivery must never stop the others
            log.exception("unexpected error handling delivery %s", claimed.delivery_id)
            return self.rules.after_failure(claimed, started, exc, permanent=True)

    async def _send(self, envelope: Envelope) -> SendResult | None:
        if self._async_send:
            result: SendResult | None = await self.transport.send(envelope)
            return result
        # A pool of `concurrency` threads, not the loop's default executor: each thread
        # keeps its transport session (SMTP connection) for the next message.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="mailoutbox-async-send"
            )
        loop = asyncio.get_running_loop()
        try:
            sent = await loop.run_in_executor(self._pool, self.transport.send, envelope)
        except (KeyboardInterrupt, SystemExit) as exc:
            # Raised by the transport on a send thread, where no host stops anything.
            raise _SendThreadExit(exc) from exc
        if inspect.isawaitable(sent):
            # A coroutine transport behind a sync wrapper, which the check for a
            # coroutine function at construction cannot see.
            sent = await sent
        return cast("SendResult | None", sent)

    async def run(self, stop: asyncio.Event | None = None, *, handle_signals: bool = False) -> None:
        """Deliver until `stop` is set (see Worker.run). Cancelling the task stops it too.

        Either way it claims nothing more, finishes the sends in flight, records
        them and hands back the deliveries it had not started; a cancellation
        waits for that (shielded, for at most the lease) and then goes on up as
        CancelledError. With handle_signals=True (in the main thread), SIGTERM
        and SIGINT stop it. A stop() asked before the task has begun ends this
        run() at once (see stop).
        """
        stop = stop or asyncio.Event()
        self._stopping = asyncio.Event()
        if self._stop_asked:
            self._stopping.set()
        loop = asyncio.get_running_loop()
        if handle_signals:
            for s in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(s, stop.set)
        watcher = asyncio.create_task(self._watch(stop))
        listener: _AsyncListener | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if self.listen and listener is None:
                        listener = await _AsyncListener.open(
                            self.engine, self.outbox.tables.notify_channel
                        )
                    report = await self._tick_to_the_end()
                    self.loop_backoff.progressed()
                    if report.claimed:
                        continue
                    if paused := self.pause.remaining():
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._stopping.wait(), paused)
                        continue
                    await self._wait(listener)
                except Exception as exc:  # noqa: BLE001 - the loop must outlive any failure (logged)
                    wait = self.loop_backoff.failed(exc)
                    if listener is not None:
                        await listener.close()
                        listener = None
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), wait)
        finally:
            self._stopping.set()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if listener is not None:
                await listener.close()
            if handle_signals:
                for s in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(s)
            await self.aclose()
            self._stop_asked = False

    async def _tick_to_the_end(self) -> TickReport:
        """tick(), which a cancellation of run() ends as stop() does, then passes on.

        A cancelled await would abandon the sends in flight: a send thread would
        go on and deliver, its outcome never recorded and the whole batch leased
        until the lease ran out, then sent again by the next worker. So the tick
        goes on, shielded: it claims nothing more, records what it sent and hands
        back the rest. Past the lease (which must exceed the longest send) waiting
        is no use: another worker may have claimed the batch by then.
        """
        tick = asyncio.ensure_future(self.tick())
        try:
            return await asyncio.shield(tick)
        except asyncio.CancelledError:
            self._stopping.set()
            await self._finish_cancelled(tick)
            raise

    async def _finish_cancelled(self, tick: asyncio.Future[TickReport]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease.total_seconds()
        while not tick.done() and (left := deadline - loop.time()) > 0:
            # Cancelled again: still the same stop, still bounded by the deadline.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({tick}, timeout=left)
        if not tick.done():
            log.warning("cancelled: sends still in flight after the lease; their outcome is lost")
            tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({tick})
        if not tick.cancelled() and (exc := tick.exception()) is not None:
            # Not str(exc): a SQLAlchemy error's text carries the statement's parameters.
            log.warning(
                "cancelled: the last batch's outcome was not recorded (%s)", type(exc).__name__
            )

    async def _watch(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopping.set()

    async def _wait(self, listener: _AsyncListener | None) -> None:
        timeout = self.poll_interval.total_seconds()
        stopping = asyncio.create_task(self._stopping.wait())
        waits: set[asyncio.Task[Any]] = {stopping}
        if listener is not None:
            waits.add(asyncio.create_task(listener.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            for task in waits:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def stop(self) -> None:
        """Ask `run()` to stop after the sends in flight.

        Asked while no run() is running, as right after
        `asyncio.create_task(worker.run())` (the task has not begun yet), the stop
        is kept for the next run(), which returns at once, claiming nothing. A
        run() that ends forgets every stop asked before it ended, so the worker
        can be run again.
        """
        self._stop_asked = True
        self._stopping.set()

    async def aclose(self) -> None:
        """Release the send threads, then the transport's connections.

        The threads first, waiting for the sends in flight (as Worker.close): a
        transport closed under a send (SmtpTransport's QUIT mid-DATA) would break
        a mail the server may then half-accept. The transport's aclose() if it
        has one, else its close().
        """
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True)
        aclose = getattr(self.transport, "aclose", None)
        if callable(aclose):
            await aclose()
        else:
            await asyncio.to_thread(close_transport, self.transport)


class _AsyncListener:
    """A dedicated autocommit async connection LISTENing on the outbox's channel."""

    def __init__(self, driver: Any, pool: sa.pool.Pool) -> None:
        self._driver = driver
        self._pool = pool

    @classmethod
    async def open(cls, engine: AsyncEngine, channel: str) -> _AsyncListener:
        raw = await engine.raw_connection()
        driver: Any = raw.driver_connection
        # Detached: this connection leaves the pool for good and is closed, not returned.
        raw.detach()
        try:
            if driver_in_transaction(driver):
                # A host's `checkout` event ran SQL: nothing of it matters to LISTEN.
                await driver.rollback()
            await driver.set_autocommit(True)
            await driver.execute(f'LISTEN "{channel}"')
        except BaseException as exc:
            retire_pool_after_loss(engine.sync_engine.pool, driver, exc)
            await driver.close()
            raise
        return cls(driver, engine.sync_engine.pool)

    async def wait(self) -> None:
        """Return when a notification arrives."""
        try:
            async for _ in self._driver.notifies(stop_after=1):
                return
        except BaseException as exc:
            retire_pool_after_loss(self._pool, self._driver, exc)
            raise

    async def close(self) -> None:
        # psycopg's own close, as in worker._Listener: no rollback on a dropped connection.
        await self._driver.close()


__all__ = ["AsyncOutbox", "AsyncStore", "AsyncWorker", "arun", "async_connection_of"]
