"""Runs the outbox's own plans straight on a pooled psycopg connection.

SQLAlchemy's Connection around a statement (execution context, events, result
wrapping) cost more client CPU than the statement itself: for one enqueue,
~250 of ~520 us here, and a client with eight threads enqueuing spends its one
core (the GIL) on it. Where the outbox owns the whole transaction (an enqueue
without `connection=`, a worker's claim and record) it checks a connection out
of the engine's pool and runs its batch statements (operations.Query with
`arrays`, compiled once by operations.driver_sql) on psycopg directly. A host's
transaction (`connection=`) and the admin operations still go through
SQLAlchemy.

What SQLAlchemy did and this keeps: errors come out as SQLAlchemy exceptions
(sa.exc.OperationalError, ProgrammingError, ...), with the driver's error as
`.orig`; a connection lost mid-statement is invalidated, so the pool drops it,
and so are the others the pool held at that moment (they are replaced when next
checked out); a connection that a host's `checkout` event left in a transaction
is worked on in that transaction, committed at the end; and the connection goes
back with the autocommit setting it came with.
What it does not keep: these statements do not pass through the engine's
cursor events (`before_cursor_execute`), so SQL instrumentation hooked there
does not see them. Parameters are never put into error messages (mail bodies
and addresses are personal data).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa

from . import operations as ops

T = TypeVar("T")

_KEPT_CURSOR = "mailoutbox.kept_cursor"


class DirectConnection:
    """One checked-out pooled connection; `run` drives a plan on it (see module doc)."""

    def __init__(self, conn: sa.Connection) -> None:
        self._conn = conn
        self._dialect = conn.dialect
        driver = conn.connection.driver_connection
        if not isinstance(driver, psycopg.Connection):
            raise TypeError("mailoutbox needs the psycopg (3) driver: postgresql+psycopg://")
        self._driver: psycopg.Connection[Any] = driver

    @property
    def driver(self) -> psycopg.Connection[Any]:
        """The psycopg connection underneath."""
        return self._driver

    def run(self, plan: ops.Plan[T]) -> T:
        """Drive a plan to its answer, executing each Query it yields."""
        try:
            query = next(plan)
            while True:
                query = plan.send(self._execute(query))
        except StopIteration as done:
            answer: T = done.value
            return answer

    def _execute(self, query: ops.Query) -> Any:
        if not query.arrays:
            # Only the batch statements are compiled for the driver (operations.driver_sql).
            raise TypeError("DirectConnection runs driver queries (Query.arrays) only")
        sql, params = ops.driver_call(query, self._dialect)
        # A statement answered by its row count, or by nothing (the NOTIFY), leaves no
        # rows behind in the cursor, so the connection's kept cursor serves; rows (a
        # claim's) go with a cursor of their own.
        kept = query.fetch in ("rowcount", "none")
        cursor = self._kept_cursor() if kept else self._driver.cursor(binary=True)
        try:
            cursor.execute(sql, params)
            return ops.fetch_rows(cursor, query.fetch)
        except psycopg.Error as exc:
            if kept:
                self._conn.connection.info.pop(_KEPT_CURSOR, None)
            raise self._translated(exc, sql, cursor) from exc
        finally:
            if not kept:
                cursor.close()

    def _kept_cursor(self) -> psycopg.Cursor[Any]:
        """A cursor that stays with the pooled connection from one checkout to the next.

        A new psycopg cursor sets up its parameter adapters anew: for `enqueue`
        from 8 threads, bound by the client's one core, keeping one cut the
        client's CPU per mail by about 6 % (benchmarks/README.md, item 16).
        """
        info = self._conn.connection.info  # follows the DBAPI connection, not the checkout
        cursor: psycopg.Cursor[Any] | None = info.get(_KEPT_CURSOR)
        if cursor is None or cursor.closed or cursor.connection is not self._driver:
            cursor = info[_KEPT_CURSOR] = self._driver.cursor(binary=True)
        return cursor

    def commit(self) -> None:
        try:
            self._driver.commit()
        except psycopg.Error as exc:
            raise self._translated(exc, "COMMIT", None) from exc

    def rollback(self) -> None:
        with contextlib.suppress(Exception):
            self._driver.rollback()

    def _translated(self, exc: psycopg.Error, sql: str, cursor: Any) -> sa.exc.StatementError:
        error: Any = exc
        lost = self._dialect.is_disconnect(error, self._conn.connection, cursor)
        if lost:
            # What SQLAlchemy's own Connection does on a disconnect: whatever ended
            # this connection (a restart, a failover, an idle timeout) most likely
            # ended the others the pool holds, so every connection opened before now
            # is replaced at its next checkout. Otherwise each one would fail a
            # statement in turn, and a worker would back off once per connection.
            self._conn.engine.pool._invalidate(self._conn.connection, exc)
            self._conn.invalidate(exc)
        return sa.exc.DBAPIError.instance(
            sql,
            None,
            exc,
            psycopg.Error,
            hide_parameters=True,
            connection_invalidated=lost,
            dialect=self._dialect,
        )

    def _set_autocommit(self, on: bool) -> None:
        if not self._conn.invalidated and self._driver.autocommit != on:
            self._driver.autocommit = on

    def in_transaction(self) -> bool:
        """Whether the connection came out of the pool already in a transaction."""
        return driver_in_transaction(self._driver)


def driver_in_transaction(driver: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether a psycopg connection is inside a transaction already.

    A host's `checkout` event that runs SQL on the DBAPI connection (a tenant for
    row-level security, a search_path) leaves a pooled connection so; psycopg then
    refuses to change autocommit. Shared by both workers and both transaction helpers.
    """
    return bool(driver.info.transaction_status != psycopg.pq.TransactionStatus.IDLE)


def retire_pool_after_loss(pool: sa.pool.Pool, driver: Any, exc: BaseException) -> None:
    """What DirectConnection does on a disconnect, for a connection outside it (LISTEN).

    An idle worker's LISTEN connection is the first to see a database restart or
    a failover. Unless the pool's connections are retired then, the worker's
    loop meets the pool's dead connections one at a time, as it opens its next
    LISTEN, and backs off after each: 3.5 s for a pool of three.
    """
    if isinstance(exc, psycopg.Error) and (driver.closed or driver.broken):
        # No connection record to compare: every connection made before now is stale.
        pool._invalidate(None, exc, _checkin=False)  # type: ignore[arg-type]


@contextlib.contextmanager
def direct(engine: sa.Engine, *, autocommit: bool = False) -> Iterator[DirectConnection]:
    """A pooled connection for plans; committed on leaving the block, rolled back on error.

    `autocommit`: for a plan whose writes are one statement, atomic on its own;
    it then costs one round trip instead of three (BEGIN, statement, COMMIT).

    A connection already in a transaction when checked out (see
    DirectConnection.in_transaction) keeps its autocommit setting: the plans run
    in that transaction, which is committed on leaving the block, as
    engine.begin() would. Otherwise the connection goes back to the pool with
    the autocommit setting it was lent with: an engine made with
    isolation_level="AUTOCOMMIT" sets it once per DBAPI connection, never again.
    """
    with engine.connect() as conn:
        direct_conn = DirectConnection(conn)
        lent_autocommit = direct_conn.driver.autocommit
        joined = direct_conn.in_transaction()
        commits = joined or not autocommit
        if not joined:
            direct_conn._set_autocommit(autocommit)
        try:
            yield direct_conn
            if commits:
                direct_conn.commit()
        except BaseException:
            if commits:
                direct_conn.rollback()
            raise
        finally:
            # Back to the pool as SQLAlchemy lent it (a broken connection is dropped anyway).
            with contextlib.suppress(Exception):
                direct_conn._set_autocommit(lent_autocommit)
